"""Speed settings of the training step outside the data path: TF32, the AdamW implementation, batches moved to the
accelerator (pinned, non-blocking, channels-last), gradient checkpointing and torch.compile.

Channels-last is applied to the batches, not the weights: convolutions pick the NHWC kernels when their input is
channels-last (cuDNN and oneDNN both do), activations stay NHWC through the network, and the weights keep the
contiguous layout that safetensors checkpoints and exports require.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

logger = logging.getLogger(__name__)


def configure_backends(allow_tf32: bool) -> None:
    """TF32 for float32 matmuls and convolutions (takes effect on Ampere and newer GPUs only)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution kernels once


DEFAULT_THREADS = torch.get_num_threads()  # PyTorch's own choice (or OMP_NUM_THREADS), before any run lowers it


def process_load_share() -> float:
    """This process's own part of the 1-minute load average: its busy fraction since it started, weighted by how
    much of the average's exponential window (60 s) that time fills. A fresh command is ~0; a test session that has
    trained in-process for minutes is ~1. Linux (/proc); 0 elsewhere."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        elapsed = float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return 0.0
    if elapsed <= 0:
        return 0.0
    return min(1.0, time.process_time() / elapsed) * (1 - math.exp(-elapsed / 60))


def choose_cpu_threads(requested: Optional[int], cores: int, others_load: float, default: int) -> tuple[int, str]:
    """PyTorch's CPU threads for a run, and how they were chosen. Unset: PyTorch's default, lowered to the cores
    that other processes leave idle (`others_load`: the load average less this process's share). OpenMP threads
    busy-wait for each other; when a busy process holds one of their cores the team waits on a descheduled thread
    at every operator: on a 2-core machine a 2-thread training step ran 2.5x slower than a 1-thread one while one
    other process was busy, and 10-20x slower while four were (docs/speed.md)."""
    if requested is not None:
        return requested, "explicit"
    free = max(1, int(cores - others_load + 0.5))
    if free >= default:
        return default, "default"
    return free, f"other processes keep {others_load:.1f} of {cores} cores busy (1-minute load average)"


def set_cpu_threads(requested: Optional[int]) -> tuple[int, str]:
    """Apply `choose_cpu_threads` to this process (CPU runs); returns the threads and how they were chosen."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads, how = choose_cpu_threads(requested, cores, max(0.0, load - process_load_share()), DEFAULT_THREADS)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads, how


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
