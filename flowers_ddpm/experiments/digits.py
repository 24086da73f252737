"""scikit-learn's handwritten digits as a small real image dataset, and a digits classifier to score samples with.

The recipe ablation (flowers_ddpm.experiments.ablation) needs a real dataset that installs offline and a feature network
trained on it; scikit-learn ships 1,797 real 8x8 digits, which we upsample to RGB class folders. No pretrained
network exists for them, so `DigitsClassifier` is trained here (seconds on a CPU) and cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
CLASSIFIER_VERSION = 1  # bump when the classifier's architecture or training changes (invalidates caches)


@dataclass
class DigitsData:
    """The digits written as class folders: `train_dir` (diffusion training and reference set), `test_dir`
    (held out: the real-vs-real baseline and the classifier's test accuracy)."""

    train_dir: Path
    test_dir: Path
    resolution: int


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits data needs scikit-learn: pip install 'flowers-ddpm[recipes]'") from None
    digits = load_digits()
    return digits.images, digits.target  # (1797, 8, 8) in 0..16, labels 0..9


def _to_rgb(image: np.ndarray, resolution: int) -> Image.Image:
    gray = Image.fromarray(np.uint8(np.round(image * (255 / 16))), mode="L")
    return gray.resize((resolution, resolution), Image.BICUBIC).convert("RGB")


def write_digits(folder: str | Path, resolution: int = 32, test_fraction: float = 0.2, seed: int = 0) -> DigitsData:
    """Write the digits as `folder/{train,test}/<digit>/<index>.png` (once; reused when already complete)."""
    folder = Path(folder)
    data = DigitsData(folder / "train", folder / "test", resolution)
    marker = folder / "COMPLETE.json"
    settings = {"resolution": resolution, "test_fraction": test_fraction, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return data
    images, labels = _load_digits()
    order = np.random.default_rng(seed).permutation(len(images))
    num_test = int(round(len(images) * test_fraction))
    for rank, index in enumerate(order):
        split = data.test_dir if rank < num_test else data.train_dir
        target = split / str(labels[index])
        target.mkdir(parents=True, exist_ok=True)
        _to_rgb(images[index], resolution).save(target / f"{index:04d}.png")
    marker.write_text(json.dumps(settings))
    return data


def load_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a class folder as uint8 NCHW plus their integer labels (class = sub-folder name)."""
    images, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(int(class_dir.name))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


class DigitsClassifier(nn.Module):
    """A small CNN; `features` (64-d, before the linear head) is the space the Frechet distance is computed in."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, NUM_CLASSES)

    @staticmethod
    def _normalise(images: torch.Tensor) -> torch.Tensor:
        return images.float() / 127.5 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """64-d features of uint8 NCHW images."""
        return self.body(self._normalise(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _shifted(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations of up to `max_shift` pixels, so off-centre samples are still classified fairly."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def _fingerprint(train: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> str:
    digest = hashlib.sha256(train.numpy().tobytes() + labels.numpy().tobytes())
    digest.update(json.dumps({"version": CLASSIFIER_VERSION, "epochs": epochs, "seed": seed}).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def predict(model: DigitsClassifier, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, predicted labels) of uint8 NCHW images."""
    model.eval()
    feats = [model.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    features = torch.cat(feats)
    return features, model.head(features).argmax(dim=1)


def train_classifier(data: DigitsData, cache_dir: str | Path, epochs: int = 15, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """The digits classifier trained on the train split (cached by data + settings), and its test accuracy."""
    train, labels = load_folder(data.train_dir)
    test, test_labels = load_folder(data.test_dir)
    key = _fingerprint(train, labels, epochs, seed)
    weights = Path(cache_dir) / f"digits_classifier_{key}.safetensors"
    model = DigitsClassifier()
    if weights.is_file():
        model.load_state_dict(load_file(weights))
    else:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=generator)
            for start in range(0, len(train), 64):
                batch = order[start:start + 64]
                loss = nn.functional.cross_entropy(model(_shifted(train[batch], generator)), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), weights)
    accuracy = float((predict(model, test)[1] == test_labels).float().mean())
    logger.info("digits classifier: test accuracy %.3f (%s)", accuracy, weights)
    return model, accuracy
