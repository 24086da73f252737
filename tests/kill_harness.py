"""Interrupt real training runs (SIGKILL, SIGTERM, SIGINT) at chosen or random moments and resume them.

Used by tests/test_kill_resume.py (a few interruptions) and scripts/soak_resume.py (50). Runs are forked from a
multiprocessing forkserver that has imported torch, diffusers, datasets and the toolkit once, so each restart
costs a second instead of a fresh interpreter; inside, each child is an ordinary `flowers-ddpm train` call.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from flowers_ddpm.training import checkpointing
from flowers_ddpm.training.stopping import EXIT_PREEMPTED

PRELOAD = ["torch", "accelerate", "datasets", "diffusers", "diffusers.training_utils", "diffusers.optimization",
           "diffusers.models.unets.unet_2d", "safetensors.torch", "flowers_ddpm.training.diffusion_run", "flowers_ddpm.training.trainer",
           "flowers_ddpm.data.stream", "flowers_ddpm.models.unet", "flowers_ddpm.pipelines.sampling", "flowers_ddpm.cli"]
MODES = ("during_save", "random", "startup", "sigterm", "sigint")


def _train_child(args: list[str], log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from flowers_ddpm.cli import main

    os._exit(main(["train", *args]))


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def newest_step(output_dir: Path) -> int:
    found = checkpointing.complete_checkpoints(output_dir)
    return found[-1][0] if found else 0


def _saving(output_dir: Path, after: int) -> bool:
    root = checkpointing.checkpoints_root(output_dir)
    return any(int(p.name.split("-")[1].split(".")[0]) > after for p in root.glob("checkpoint-*.tmp"))


@dataclass
class InterruptionReport:
    kills: int = 0  # SIGKILLs delivered to a running process
    kills_during_save: int = 0  # ... that left a half-written checkpoint-<step>.tmp behind
    signals: int = 0  # SIGTERM/SIGINT delivered
    clean_stops: int = 0  # ... after which the process exited with EXIT_PREEMPTED and a checkpoint of its step
    stop_seconds: list = field(default_factory=list)  # signal -> exit
    resumes: int = 0  # runs started while a checkpoint existed
    resumes_loaded: int = 0  # runs that logged "resumed from" (loaded a checkpoint; the rest were killed earlier)
    modes: list = field(default_factory=list)


def _wait(process, condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process.is_alive() and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return False


def interrupt_and_resume(args: list[str], output_dir: Path, modes: list[str], seed: int = 0,
                         log_path: Path | None = None, timeout: float = 300) -> InterruptionReport:
    """Start the run, interrupt it once per mode in `modes`, then run it to the end; returns what happened.

    Every start uses the same command line (with --resume_from_checkpoint latest). Modes: during_save (SIGKILL
    while a checkpoint is being written), random (SIGKILL 0-0.2 s after a new checkpoint), startup (SIGKILL
    0-1 s after the start, before or while resuming), sigterm / sigint (clean stop, expects exit code 75).
    """
    rng, ctx, report = random.Random(seed), _context(), InterruptionReport()
    log = str(log_path or output_dir.with_suffix(".log"))
    for mode in modes:
        before = newest_step(output_dir)
        report.resumes += before > 0
        process = ctx.Process(target=_train_child, args=(args, log))
        process.start()
        if mode == "during_save":
            _wait(process, lambda: _saving(output_dir, before), timeout)
            time.sleep(rng.uniform(0, 0.01))
        elif mode == "startup":
            time.sleep(rng.uniform(0, 1.0))
        else:
            _wait(process, lambda: newest_step(output_dir) > before, timeout)
            time.sleep(rng.uniform(0, 0.2 if mode == "random" else 0.05))
        if not process.is_alive():
            raise RuntimeError(f"the run ended (exit code {process.exitcode}) before it could be interrupted; "
                               f"use more max_train_steps (see {log})")
        report.modes.append(mode)
        if mode in ("sigterm", "sigint"):
            sent = time.monotonic()
            os.kill(process.pid, signal.SIGTERM if mode == "sigterm" else signal.SIGINT)
            process.join(timeout)
            report.signals += 1
            report.stop_seconds.append(time.monotonic() - sent)
            stopped_at = _stop_step(Path(log))
            if process.exitcode == EXIT_PREEMPTED and stopped_at == newest_step(output_dir):
                report.clean_stops += 1
        else:
            process.kill()
            process.join()
            report.kills += 1
            report.kills_during_save += _saving(output_dir, before)
    report.resumes += newest_step(output_dir) > 0
    process = ctx.Process(target=_train_child, args=(args, log))
    process.start()
    process.join(timeout)
    if process.exitcode != 0:
        raise RuntimeError(f"the final resume failed with exit code {process.exitcode}; see {log}")
    report.resumes_loaded = Path(log).read_text(errors="replace").count("INFO flowers_ddpm.training.trainer: resumed from")
    return report


def _stop_step(log: Path) -> int | None:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("stopped: ")]
    if not lines:
        return None
    return int(lines[-1].split(" at step ")[1].split(";")[0])


def read_data_order(path: Path) -> dict[int, list]:
    """step -> example ids; when a step was trained more than once (after a kill), the last time counts."""
    order = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # the line a SIGKILL cut short
            continue
        order[entry["step"]] = entry["ids"]
    return order
