"""Feature networks for the metrics: the standard FID Inception network, DINOv2, or an injected replacement.

A feature network is an `nn.Module` that maps a batch of uint8 images (N, 3, H, W) at their native resolution
to `{"features": (N, D) float tensor, "logits": (N, C) float tensor (optional, for the Inception Score)}`,
resizing inside itself exactly as its protocol does. It has a `name`; `fingerprint()` (name + weights) keys the
reference-statistics cache.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import UserError

# The FID Inception weights (TensorFlow's 2015-12-05 graph converted by torch-fidelity), as torchmetrics uses them.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
DINOV2_DEFAULT = "facebook/dinov2-base"


def fingerprint(network: nn.Module) -> str:
    """`name:sha1-of-weights`: changes whenever the network or its weights change."""
    digest = hashlib.sha1()
    for key, tensor in sorted(network.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too (BatchNorm counters)
    return f"{getattr(network, 'name', type(network).__name__)}:{digest.hexdigest()[:16]}"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_inception_weights(path: Optional[str]) -> Path:
    """The Inception weights file: `path`, else torch's hub cache, else downloaded there (not when HF_HUB_OFFLINE=1)."""
    hint = (f"the FID Inception weights {INCEPTION_WEIGHTS_FILE} are needed; download them from "
            f"{INCEPTION_WEIGHTS_URL} and pass --inception_weights PATH")
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"inception_weights {path} does not exist; {hint}")
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return cached
    if _offline():
        raise UserError(f"offline (HF_HUB_OFFLINE=1) and {cached} is missing: {hint}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(cached), progress=True)
    except Exception as e:  # urllib raises URLError, HTTPError, TimeoutError, ... when offline
        raise UserError(f"cannot download {INCEPTION_WEIGHTS_URL} ({type(e).__name__}): {hint}") from None
    return cached


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception (2048-d pool features + unbiased logits for IS) in one forward pass.

    Images are resized to 299x299 with TensorFlow-1-compatible bilinear interpolation (antialias=False), the
    protocol of the original FID code, pytorch-fid and torch-fidelity, so numbers compare with papers.
    """

    name = "inception-v3-compat"

    def __init__(self, weights: Path):
        super().__init__()
        try:
            import torch_fidelity  # noqa: F401  torchmetrics builds its Inception from torch-fidelity's definition
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError:
            raise UserError("the FID Inception network needs torch-fidelity: pip install 'flowers-ddpm[inception]' "
                            "(or pip install torch-fidelity)") from None
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(weights), antialias=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict:
        features, logits = self.net._torch_fidelity_forward(images)
        return {"features": features, "logits": logits}


class Dinov2Features(nn.Module):
    """The CLS token (after the final layer norm) of a `transformers` DINOv2, as in Stein et al. 2023 (dgm-eval):
    images scaled to [0, 1], resized to the model's image size (bicubic), normalised with ImageNet mean/std."""

    def __init__(self, model_id: str = DINOV2_DEFAULT):
        super().__init__()
        from transformers import AutoModel

        try:
            self.model = AutoModel.from_pretrained(model_id)
        except OSError as e:  # not found, or offline without a cached copy
            raise UserError(f"cannot load DINOv2 model {model_id} ({str(e).splitlines()[0]}); pass --dinov2_model "
                            "with a local copy, or --dinov2_model none to skip FD-DINOv2") from None
        self.model.eval()
        self.name = f"dinov2:{model_id}"
        self.size = int(self.model.config.image_size)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict:
        x = images.float().div(255.0)
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True,
                                      align_corners=False)
        x = ((x - self.mean) / self.std).to(self.model.dtype)
        return {"features": self.model(pixel_values=x).pooler_output.float()}


def load_factory(spec: str) -> nn.Module:
    """Build a replacement feature network from `package.module:function` (called without arguments)."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"feature network {spec!r} is not an importable `module:function`") from None
    network = factory()
    if not isinstance(network, nn.Module):
        raise UserError(f"feature network {spec!r} must return a torch.nn.Module")
    return network.eval().requires_grad_(False)  # features are measurements: no graph, no grad-carrying metrics


def build_inception_network(weights: Optional[str], replacement: Optional[str] = None) -> nn.Module:
    """The FID/KID/IS/precision-recall network: the standard Inception, or the `module:function` replacement."""
    if replacement:
        return load_factory(replacement)
    return InceptionFeatures(resolve_inception_weights(weights))


def build_dinov2_network(model_id: Optional[str]) -> Optional[nn.Module]:
    """The FD-DINOv2 network, or None when `model_id` is None / 'none'."""
    if model_id is None or model_id.lower() == "none":
        return None
    return Dinov2Features(model_id)
