"""Which process this is, collecting per-process results (features, ids) on every process in rank order, and
stopping all processes together when one of them fails."""

from __future__ import annotations

import contextlib
import sys
from typing import Optional

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, pad_across_processes, parse_flag_from_env
from tqdm import tqdm

from ..errors import UserError, user_error_of


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


def fail_together(accelerator, error: Optional[BaseException]) -> None:
    """In place of a barrier after work that may fail on some processes only (a write the disk refuses): every
    process calls this at the same point with what its own work raised, or None. If any process failed, every
    process raises: a failed one its own error, the others the first failed process's problem as a UserError of
    the same message and exit code (a RuntimeError naming it if it was not a problem the user can fix). The main
    process prints the problem ('error: ...') before any process raises, and such errors are marked `reported`, so
    that the command line does not print them again (once per launch, and before the launcher stops the processes
    that are still running when the first one exits).

    Without the agreement the others would wait in their next collective until the failed process exits, then die
    of the lost connection with a traceback and exit code 1, which the launcher reports instead of the real one."""
    problem = None if error is None else user_error_of(error)
    if accelerator.num_processes == 1:
        if error is not None:
            _raise(error, problem)
        return
    if problem is not None:
        mine = ("user", str(problem), problem.exit_code)
    else:
        mine = None if error is None else ("bug", f"{type(error).__name__}: {error}", 1)
    failures = [(rank, o) for rank, o in enumerate(gather_object([mine])) if o is not None]
    if not failures:
        return
    rank, (kind, message, exit_code) = failures[0]
    if kind == "user" and accelerator.is_main_process:
        tqdm.write(f"error: {message}", file=sys.stderr)  # on a line of its own below any open progress bar
        sys.stderr.flush()
    accelerator.wait_for_everyone()  # nobody exits before the main process has said why
    if error is not None:
        if problem is not None:
            problem.reported = True
        _raise(error, problem)
    if kind == "bug":
        raise RuntimeError(f"process {rank} of the launch failed: {message}")
    shared = UserError(message)
    shared.exit_code, shared.reported = exit_code, True
    raise shared


def _raise(error: BaseException, problem: Optional[UserError]) -> None:
    """Raise this process's own failure: as the UserError it amounts to (caused by the original), or as it is."""
    if problem is None or problem is error:
        raise error
    raise problem from error


@contextlib.contextmanager
def together(accelerator):
    """`with together(accelerator):` around work that may fail on some processes only (typically main-process
    writes), in place of the barrier after it: see fail_together. Every process must enter it at the same point."""
    error = None
    try:
        yield
    except Exception as e:
        error = e
    fail_together(accelerator, error)
