"""Which process this is, collecting per-process results (features, ids) on every process in rank order, and
failing together."""

from __future__ import annotations

import pickle
from typing import Callable

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, pad_across_processes, parse_flag_from_env


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


def together(accelerator, work: Callable[[], None]) -> None:
    """Run `work()` on this process, then wait for every process (in place of `accelerator.wait_for_everyone()`).
    An exception on any process is raised on every one: here as itself, on the others as a copy of the first
    failing process's exception (a RuntimeError with its text when it cannot be pickled), so a user error such as
    a full disk reads the same on all of them and no process waits at a later collective for one that has stopped.
    accelerate has no such helper: its wait_for_everyone is a bare barrier."""
    error = None
    try:
        work()
    except Exception as e:  # any exception: the other processes must hear of it before this one stops
        error = e
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return
    sent = error
    if error is not None:
        try:
            pickle.dumps(error)
        except Exception:  # an exception holding something unpicklable travels as its text
            sent = RuntimeError(f"{type(error).__name__}: {error}")
    received = gather_object([sent])
    if error is not None:
        raise error
    failed = [e for e in received if e is not None]
    if failed:
        raise failed[0]
