"""Metrics between two sets of precomputed features: FID, KID, IS (torchmetrics), improved precision/recall, FD.

The feature network runs once per image (see features.py) and its outputs are handed to torchmetrics through an
identity "feature extractor", so FID, KID and IS share one Inception pass and the cached reference features.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance


class _Precomputed(nn.Module):
    """Identity feature extractor: torchmetrics receives features we already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@contextlib.contextmanager
def _quiet_buffer_warning():
    """KID and IS keep all features in memory by design; we pass them features, not images, so that is fine."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        yield


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (torchmetrics' FID, in float64)."""
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID mean and std over random subsets (torchmetrics); subsets drawn from a fixed seed."""
    size = min(subset_size, len(real), len(fake))
    with _quiet_buffer_warning():
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size,
                                         sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score mean and std over splits (torchmetrics), from unbiased logits."""
    with _quiet_buffer_warning():
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=min(splits, len(logits)),
                                sync_on_compute=False)
    metric.update(logits.double())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radii(points: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    radii = []
    for start in range(0, len(points), chunk):
        distances = torch.cdist(points[start:start + chunk], points)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # k + 1: the nearest point is the point itself
    return torch.cat(radii)


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, chunk: int) -> float:
    """Fraction of `queries` inside at least one ball (manifold point, its radius)."""
    inside = []
    for start in range(0, len(queries), chunk):
        distances = torch.cdist(queries[start:start + chunk], manifold)
        inside.append((distances <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(inside).float().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-nearest-neighbour manifolds.

    Precision: fraction of fake samples inside the real manifold (union of balls around each real feature with
    radius = distance to its k-th nearest real neighbour); recall: the same with the roles swapped.
    Our own code: neither torchmetrics nor another maintained PyTorch library provides this metric (torch-fidelity
    has it, but only behind its own dataset-driven pipeline, not on precomputed features).
    """
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    real, fake = real.double(), fake.double()
    precision = _coverage(real, _kth_neighbour_radii(real, k, chunk), fake, chunk)
    recall = _coverage(fake, _kth_neighbour_radii(fake, k, chunk), real, chunk)
    return precision, recall


def compute_metrics(real: dict, fake: dict, real_dino: Optional[torch.Tensor] = None,
                    fake_dino: Optional[torch.Tensor] = None, kid_subset_size: int = 1000,
                    with_precision_recall: bool = True) -> dict:
    """All metrics from feature dicts ({'features', optional 'logits'}); keys as they appear in metrics.json."""
    out = {"fid": frechet_distance(real["features"], fake["features"])}
    out["kid_mean"], out["kid_std"] = kernel_distance(real["features"], fake["features"], subset_size=kid_subset_size)
    if fake.get("logits") is not None:
        out["is_mean"], out["is_std"] = inception_score(fake["logits"])
    if with_precision_recall:
        out["precision"], out["recall"] = precision_recall(real["features"], fake["features"])
    if real_dino is not None and fake_dino is not None:
        out["fd_dinov2"] = frechet_distance(real_dino, fake_dino)
    return out
