"""Non-leaking augmentation (Karras et al. 2022, EDM's AugmentPipe), applied to the training batch on its device.

Each image gets each transform with probability p: x-flip, integer translation, isotropic scaling, rotation,
anisotropic scaling (geometric, one affine resample with reflection padding), then brightness, contrast and
saturation. Every image also gets a label vector saying what was done (zeros where nothing was), which conditions
the UNet (models/augment_conditioning.py), so the model learns augmented images as their own condition and draws
un-augmented ones at label 0: the augmentations do not leak into the samples.

Own code because the library augmenters (torchvision, kornia) do not return the parameters as a label vector in
EDM's form; the ranges follow EDM's CIFAR-10 setting (translation up to 1/8 of the size, log2 scale and anisotropy
N(0, 0.2^2), rotation uniform in +-180 degrees) and StyleGAN2-ADA's colour ranges. Hue rotation is left out.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F

# x-flip, integer translation (x, y), log2 scale, rotation (cos - 1, sin), anisotropy (2), brightness, log2 contrast,
# log2 saturation
LABEL_DIM = 11


class AugmentPipe:
    """`pipe(images)` -> (augmented images, labels of shape (batch, LABEL_DIM)); images in [-1, 1], NCHW."""

    def __init__(self, p: float, translate_max: float = 0.125, scale_std: float = 0.2, rotate_max: float = 1.0,
                 aniso_std: float = 0.2, brightness_std: float = 0.2, contrast_std: float = 0.5,
                 saturation_std: float = 1.0):
        self.p = p
        self.translate_max, self.scale_std, self.rotate_max = translate_max, scale_std, rotate_max
        self.aniso_std = aniso_std
        self.brightness_std, self.contrast_std, self.saturation_std = brightness_std, contrast_std, saturation_std

    def _gate(self, n: int, device) -> torch.Tensor:
        """1 for the images that get a transform (probability p each), else 0."""
        return (torch.rand(n, device=device) < self.p).float()

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, channels, height, width = images.shape
        device = images.device
        labels = torch.zeros(n, LABEL_DIM, device=device)
        if self.p <= 0:
            return images, labels
        gate = lambda: self._gate(n, device)  # noqa: E731

        # geometric: theta maps output to input coordinates ([-1, 1], align_corners=False; images are square)
        flip = gate() * torch.randint(2, (n,), device=device)  # EDM: a random flip (or not) with probability p
        shift = torch.round((torch.rand(2, n, device=device) * 2 - 1) * self.translate_max
                            * torch.tensor([[width], [height]], device=device)) * gate()
        log_scale = torch.randn(n, device=device) * self.scale_std * gate()
        angle = (torch.rand(n, device=device) * 2 - 1) * math.pi * self.rotate_max * gate()
        log_aniso = torch.randn(n, device=device) * self.aniso_std * gate()
        aniso_dir = torch.rand(n, device=device) * 2 * math.pi
        labels[:, 0] = flip
        labels[:, 1], labels[:, 2] = shift[0] / width, shift[1] / height
        labels[:, 3] = log_scale
        labels[:, 4], labels[:, 5] = torch.cos(angle) - 1, torch.sin(angle)
        labels[:, 6], labels[:, 7] = log_aniso * torch.cos(aniso_dir), log_aniso * torch.sin(aniso_dir)

        geometric = labels[:, :8].abs().sum(1) > 0
        if geometric.any():
            matrix = _rotation(-aniso_dir) @ _scale(2 ** log_aniso, 2 ** -log_aniso) @ _rotation(aniso_dir)
            matrix = _rotation(angle) @ matrix
            matrix = _scale(2 ** -log_scale, 2 ** -log_scale) @ matrix
            matrix = _scale(1 - 2 * flip, torch.ones_like(flip)) @ matrix
            theta = torch.cat([matrix, torch.stack([2 * shift[0] / width, 2 * shift[1] / height], 1)[..., None]], 2)
            index = geometric.nonzero()[:, 0]
            picked = images[index]
            grid = F.affine_grid(theta[index].to(picked.dtype), list(picked.shape), align_corners=False)
            moved = F.grid_sample(picked, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            images = images.index_copy(0, index, moved)

        # colour
        brightness = torch.randn(n, device=device) * self.brightness_std * gate()
        log_contrast = torch.randn(n, device=device) * self.contrast_std * gate()
        log_saturation = torch.randn(n, device=device) * self.saturation_std * gate()
        if channels != 3:
            log_saturation = torch.zeros_like(log_saturation)  # saturation needs colour channels
        labels[:, 8], labels[:, 9], labels[:, 10] = brightness, log_contrast, log_saturation
        coloured = labels[:, 8:].abs().sum(1) > 0
        if coloured.any():
            view = (-1, 1, 1, 1)
            changed = images + brightness.view(view).to(images.dtype)
            mean = changed.mean(dim=(1, 2, 3), keepdim=True)
            changed = mean + (changed - mean) * (2 ** log_contrast).view(view).to(images.dtype)
            gray = changed.mean(dim=1, keepdim=True)
            changed = gray + (changed - gray) * (2 ** log_saturation).view(view).to(images.dtype)
            images = torch.where(coloured.view(view), changed, images)  # untouched images stay bit-identical
        return images, labels


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero], 1), torch.stack([zero, sy], 1)], 1)


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)


class AugmentedObjective:
    """Wraps an objective (`objective(model, batch)` -> loss): the batch is augmented first, and the objective's
    forward passes run inside `condition(model, labels)`, a context manager that conditions the UNet on the labels
    (models.augment_conditioning.augment_labels; passed in, as objectives do not import models)."""

    def __init__(self, objective, pipe: AugmentPipe, condition: Callable[[Any, torch.Tensor], ContextManager]):
        self.objective, self.pipe, self.condition = objective, pipe, condition

    def __call__(self, model, batch: dict) -> torch.Tensor:
        images, labels = self.pipe(batch["pixel_values"])
        with self.condition(model, labels):
            return self.objective(model, {**batch, "pixel_values": images})
