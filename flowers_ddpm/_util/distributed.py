"""Which process this is, and collecting per-process results (features, ids) on every process, in rank order."""

from __future__ import annotations

import torch
from accelerate.utils import pad_across_processes


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
