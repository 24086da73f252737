"""Which process this is, and collecting per-process results (features, ids) on every process, in rank order."""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import pad_across_processes, parse_flag_from_env


def process_state() -> PartialState:
    """accelerate's process state as the run's Accelerator will see it. A bare `PartialState()` ignores
    ACCELERATE_USE_CPU (the Accelerator reads it), so on a CPU-only machine under a multi-process launch it becomes a
    single process, and every process would act as the main one; created first, it is the state every later
    Accelerator shares."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def gather_rows(accelerator, rows: torch.Tensor) -> torch.Tensor:
    """Concatenate a (n_r, ...) tensor from every process r in rank order; n_r may differ between processes."""
    if accelerator.num_processes == 1:
        return rows

    device = accelerator.device
    counts = accelerator.gather(torch.tensor([len(rows)], device=device)).tolist()
    padded = pad_across_processes(rows.to(device), dim=0)
    gathered = accelerator.gather(padded).cpu()
    width = padded.shape[0]
    return torch.cat([gathered[r * width: r * width + n] for r, n in enumerate(counts)])
