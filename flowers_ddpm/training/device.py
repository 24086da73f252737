"""Speed settings of the training step outside the data path: TF32, the AdamW implementation, batches moved to the
accelerator (pinned, non-blocking, channels-last), gradient checkpointing and torch.compile.

Channels-last is applied to the batches, not the weights: convolutions pick the NHWC kernels when their input is
channels-last (cuDNN and oneDNN both do), activations stay NHWC through the network, and the weights keep the
contiguous layout that safetensors checkpoints and exports require.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Iterator

import torch

logger = logging.getLogger(__name__)


def configure_backends(allow_tf32: bool) -> None:
    """TF32 for float32 matmuls and convolutions (takes effect on Ampere and newer GPUs only)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution kernels once


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is fast on `device` (GPUs with bf16 units, CPUs with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def prepare_model(model, gradient_checkpointing: bool = False, compile: bool = False, xformers: bool = False):
    """Enable gradient checkpointing, xformers attention and/or compile the UNet in place (before
    `accelerator.prepare`)."""
    if xformers:
        if importlib.util.find_spec("xformers") is not None:
            model.enable_xformers_memory_efficient_attention()
        else:
            logger.info("xformers is not installed: attention uses PyTorch's scaled_dot_product_attention, which is "
                        "memory-efficient as well")
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if compile:
        # nn.Module.compile keeps the UNet2DModel object and its state-dict names, so checkpoints, EMA and the
        # exported pipeline are the same as without compile (torch.compile(model) would wrap it).
        model.compile()
    return model


class DeviceBatches:
    """Wraps a DataStream: moves each batch to `device` (pinned memory and non-blocking copies on CUDA) and makes
    the pixels channels-last. The data position (state_dict) is the wrapped stream's."""

    def __init__(self, batches, device: torch.device, channels_last: bool = True):
        self.batches, self.device, self.channels_last = batches, torch.device(device), channels_last

    def __iter__(self) -> Iterator[dict]:
        cuda = self.device.type == "cuda"
        for batch in self.batches:
            moved = dict(batch)
            for name in ("pixel_values", "class_labels"):
                tensor = batch[name]
                if cuda:
                    tensor = tensor.pin_memory()
                moved[name] = tensor.to(self.device, non_blocking=cuda)
            layout = torch.channels_last if self.channels_last else torch.contiguous_format
            moved["pixel_values"] = moved["pixel_values"].contiguous(memory_format=layout)  # no copy when it is
            yield moved

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)

    @property
    def skipped(self) -> int:
        return self.batches.skipped
