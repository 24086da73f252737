"""Augmentation labels as a training-only condition of a diffusers UNet2DModel (EDM's `augment_dim`).

Non-leaking augmentation (Karras et al. 2022) tells the network which augmentation each training image got, so it
learns augmented images as a separate condition and samples un-augmented ones when the condition is zero. EDM adds
a bias-free linear map of the label vector to the noise embedding; UNet2DModel has no input for it, so here a
bias-free `nn.Linear` lives inside `unet.time_embedding` (as `augment_embedding`) and a forward hook adds its output
to the time embedding while labels are set (`augment_labels`). Without labels (sampling, evaluation) the hook adds
nothing, and a zero label vector through a bias-free layer adds exactly zero, so the UNet exported without the
layer (`without_augment_conditioning`) is the trained model at label 0: a plain UNet2DModel, no extra parameters.

The layer is a submodule of the UNet while training, so the optimizer, the EMA, post-hoc EMA profiles and
accelerate's checkpoints hold it like any other weight (resume stays exact). It starts at zero, so the conditioned
UNet starts as the unconditioned one (also for fine-tuning).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

LAYER_NAME = "augment_embedding"  # state-dict key: time_embedding.augment_embedding.weight
_LABELS = "_augment_labels"


def _add_augment_embedding(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of `time_embedding`: output + augment_embedding(labels), when both are there."""
    layer = module._modules.get(LAYER_NAME)
    labels = module.__dict__.get(_LABELS)
    if layer is None or labels is None:
        return output
    return output + layer(labels.to(layer.weight.dtype)).to(output.dtype)


def attach_augment_conditioning(unet, label_dim: int) -> None:
    """Give `unet` (a UNet2DModel) a zero-initialised bias-free projection of `label_dim` augmentation labels onto
    its time embedding."""
    embedding = unet.time_embedding
    layer = nn.Linear(label_dim, embedding.linear_2.out_features, bias=False)
    nn.init.zeros_(layer.weight)
    embedding.add_module(LAYER_NAME, layer.to(device=embedding.linear_2.weight.device,
                                              dtype=embedding.linear_2.weight.dtype))
    embedding.register_forward_hook(_add_augment_embedding)


def conditioned_embedding(model: nn.Module) -> Optional[nn.Module]:
    """The time embedding that carries the augment layer, inside any wrapper (DDP, torch.compile, peft); or None."""
    for module in model.modules():
        if LAYER_NAME in module._modules:
            return module
    return None


@contextlib.contextmanager
def augment_labels(model: nn.Module, labels: torch.Tensor) -> Iterator[None]:
    """Within this block the forward passes of `model` are conditioned on `labels` (batch x label_dim)."""
    embedding = conditioned_embedding(model)
    if embedding is None:
        raise ValueError("the model has no augment conditioning (attach_augment_conditioning)")
    embedding.__dict__[_LABELS] = labels
    try:
        yield
    finally:
        embedding.__dict__[_LABELS] = None


@contextlib.contextmanager
def without_augment_conditioning(unet: nn.Module) -> Iterator[nn.Module]:
    """`unet` without its augment layer for the block (an export: a plain UNet2DModel); put back afterwards."""
    embedding = conditioned_embedding(unet)
    layer = embedding._modules.pop(LAYER_NAME) if embedding is not None else None
    try:
        yield unet
    finally:
        if layer is not None:
            embedding._modules[LAYER_NAME] = layer
