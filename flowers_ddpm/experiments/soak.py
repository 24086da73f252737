"""Soak test of crash-safe resume: interrupt real training runs (SIGKILL, SIGTERM, SIGINT) at chosen or random
moments, resume them with the same command each time, and compare the final weights, EMA, optimizer state and
data order with an uninterrupted run.

Used by tests/test_kill_resume.py (a few interruptions) and `python scripts/soak_resume.py` (`main`, 50). Runs are
forked from a multiprocessing forkserver that has imported torch, diffusers, datasets and the toolkit once, so each
restart costs a second instead of a fresh interpreter; inside, each child runs the `flowers-ddpm train` command
through its entry point (`python -m flowers_ddpm`, start-up signal handling included), as a user starts it.
The runs train the `tiny` preset (the repository's configs/tiny.yaml) on a generated folder of coloured discs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import runpy
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from ..training import checkpointing
from ..training.stopping import EXIT_PREEMPTED

# The repository's configs/ (the soak runs from a checkout, like the tests that share these helpers).
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
COLOURS = {"blue": (40, 60, 220), "red": (220, 40, 40)}

PRELOAD = ["torch", "accelerate", "datasets", "diffusers", "diffusers.training_utils", "diffusers.optimization",
           "diffusers.models.unets.unet_2d", "safetensors.torch", "flowers_ddpm.training.diffusion_run",
           "flowers_ddpm.training.trainer", "flowers_ddpm.data.stream", "flowers_ddpm.models.unet",
           "flowers_ddpm.pipelines.sampling", "flowers_ddpm.cli"]
MODES = ("during_save", "random", "startup", "sigterm", "sigint")


# -- the run: generated data, a seconds-long tiny training command ---------------------------------------------------
def make_class_folder(root: Path, per_class: int = 12, colours: dict = COLOURS) -> Path:
    """A folder with one sub-folder per class; each image is a coloured disc on a light background."""
    for name, colour in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (20 + i % 5, 18 + i % 3), (235, 235, 235))
            ImageDraw.Draw(image).ellipse([3, 3, 16, 15], fill=colour)
            image.save(root / name / (f"{i:02d}.jpg" if i % 2 else f"{i:02d}.png"))
    return root


def tiny_train_args(data: Path, out: Path, **overrides) -> list[str]:
    """Command-line flags for a seconds-long CPU run of the tiny preset (fp32, channels-last, eager: reproducible,
    and no timed probe of precision, layout or compile at start). The shuffle buffer holds a test folder's whole
    epoch, so the data is shuffled exactly as by default; tests of the smaller buffer pass shuffle_buffer_size."""
    settings = dict(
        config=str(CONFIGS / "tiny.yaml"), train_data_dir=str(data), output_dir=str(out),
        resolution=16, train_batch_size=4, max_train_steps=6, checkpointing_steps=2, save_images_steps=100,
        eval_batch_size=2, ddpm_num_inference_steps=2, shuffle_buffer_size=100, logger="none", mixed_precision="no",
        channels_last=True, compile=False,
    )
    settings.update(overrides)
    args = []
    for key, value in settings.items():
        if value is None:  # left unset (e.g. channels_last=None: auto)
            continue
        if value is True:
            args.append(f"--{key}")
        elif value is False:
            args.append(f"--no-{key}")
        else:
            args += [f"--{key}", str(value)]
    return args


# -- interrupting and resuming ----------------------------------------------------------------------------------------
def _train_child(args: list[str], log_path: str) -> None:
    """A forkserver child: `python -m flowers_ddpm train ARGS`, output appended to `log_path`, exit code as the
    command's."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["flowers-ddpm", "train", *args]
    try:
        runpy.run_module("flowers_ddpm", run_name="__main__", alter_sys=True)  # ends in sys.exit(main())
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_train_command(args: list[str], log_path: Path, timeout: float = 600) -> int:
    """`flowers-ddpm train ARGS` in a forkserver child, to the end; its exit code."""
    process = _context().Process(target=_train_child, args=(args, str(log_path)))
    process.start()
    process.join(timeout)
    return process.exitcode


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
    report.resumes_loaded = Path(log).read_text(errors="replace").count(
        "INFO flowers_ddpm.training.trainer: resumed from")
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


def assert_same_final_state(a: Path, b: Path) -> None:
    """Both checkpoints verify, and their weights, EMA, optimizer state and trainer state are identical."""
    checkpointing.verify_checkpoint(a)
    checkpointing.verify_checkpoint(b)
    for name in ("model.safetensors", "ema.safetensors"):
        weights_a, weights_b = load_file(a / name), load_file(b / name)
        assert weights_a.keys() == weights_b.keys()
        assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), name
    opt_a = torch.load(a / "optimizer.bin", weights_only=True)
    opt_b = torch.load(b / "optimizer.bin", weights_only=True)
    for key, state in opt_a["state"].items():
        assert all(torch.equal(state[n], opt_b["state"][key][n]) for n in state)
    assert (a / "trainer_state.json").read_text() == (b / "trainer_state.json").read_text()


# -- the soak command (scripts/soak_resume.py) ------------------------------------------------------------------------
def add_bad_files(folder: Path, fraction: float) -> Path:
    """Mix unreadable files into a class folder so that they make up `fraction` of its files: truncated JPEGs, empty
    PNGs and text files named .png, spread over the classes."""
    good = sorted(p for p in folder.rglob("*") if p.is_file())
    for i in range(round(len(good) * fraction / (1 - fraction))):
        source = good[i % len(good)]
        kind = i % 3
        target = source.parent / f"bad{i:02d}{'.jpg' if kind == 0 else '.png'}"
        if kind == 0:
            target.write_bytes(good[1].read_bytes()[:40])
        elif kind == 1:
            target.write_bytes(b"")
        else:
            target.write_text("not an image")
    return folder


def main(argv: Optional[list[str]] = None) -> int:
    """Interrupt one run many times, resume it each time, compare with an uninterrupted run; 0 when every resume
    succeeded and the final state matches.

        python scripts/soak_resume.py --kills 50 --seed 0 [--workdir DIR]
    """
    parser = argparse.ArgumentParser(description="Soak test of crash-safe resume: interrupt one training run many "
                                                 "times (SIGKILL at random moments, during saves and at start-up, "
                                                 "plus some SIGTERM/SIGINT), resume it with the same command each "
                                                 "time, and compare its final weights, EMA, optimizer state and data "
                                                 "order with an uninterrupted run.")
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs to deliver")
    parser.add_argument("--signals", type=int, default=4, help="SIGTERM/SIGINT stops to deliver as well")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--bad_fraction", type=float, default=0.0,
                        help="share of unreadable files (truncated, empty, text named .png) mixed into the images")
    parser.add_argument("--shuffle_buffer_size", type=int, default=10,
                        help="the runs' shuffle buffer (1000 is the training default)")
    args = parser.parse_args(argv)
    if not 0 <= args.bad_fraction < 1:
        parser.error("--bad_fraction must be in [0, 1)")

    rng = random.Random(args.seed)
    kill_modes = [m for m in MODES if m not in ("sigterm", "sigint")]
    modes = [rng.choice(kill_modes) for _ in range(args.kills)] + [rng.choice(["sigterm", "sigint"])
                                                                    for _ in range(args.signals)]
    rng.shuffle(modes)
    # only random/sigterm/sigint interruptions let steps complete, a few each (more since the exact shuffle made a
    # tiny step cheaper: with 2 each, 2 of 3 soaks ended before their last interruption): every one lands before the end
    steps = 4 * sum(m in ("random", "sigterm", "sigint") for m in modes) + 8
    work = Path(args.workdir or tempfile.mkdtemp(prefix="soak_resume_"))
    data = add_bad_files(make_class_folder(work / "images"), args.bad_fraction)
    flags = dict(max_train_steps=steps, checkpointing_steps=1, checkpoints_total_limit=2, log_data_order=True,
                 random_flip=True, shuffle_buffer_size=args.shuffle_buffer_size, train_batch_size=3, logger="none")
    straight, interrupted = work / "straight", work / "interrupted"

    started = time.monotonic()
    if run_train_command(tiny_train_args(data, straight, **flags), straight.with_suffix(".log")) != 0:
        print(f"the uninterrupted run failed; see {straight.with_suffix('.log')}")
        return 1
    report = interrupt_and_resume(tiny_train_args(data, interrupted, resume_from_checkpoint="latest", **flags),
                                  interrupted, modes, seed=args.seed)
    try:
        name = f"checkpoints/checkpoint-{steps}"
        assert_same_final_state(straight / name, interrupted / name)
        assert read_data_order(interrupted / "data_order/rank0.jsonl") == read_data_order(
            straight / "data_order/rank0.jsonl")
        match = True
    except AssertionError as e:
        match = False
        print(f"final state differs: {e}")
    ok = match and report.clean_stops == report.signals
    counts = ", ".join(f"{m}={modes.count(m)}" for m in sorted(set(modes)))
    print(f"steps: {steps}, interruptions: {len(modes)} ({counts})")
    print(f"SIGKILLs delivered: {report.kills} (of which left a half-written checkpoint: {report.kills_during_save})")
    print(f"SIGTERM/SIGINT: {report.signals}, clean stops with exit code 75 and a checkpoint: {report.clean_stops}, "
          f"slowest stop: {max(report.stop_seconds, default=0):.1f} s")
    print(f"restarts from a checkpoint: {report.resumes}, of which loaded it and trained on (the others were killed "
          f"before or while loading): {report.resumes_loaded}; every restart ran until we interrupted it or finished")
    print(f"final weights, EMA, optimizer state and data order match the uninterrupted run: {match}")
    print(f"wall time: {time.monotonic() - started:.0f} s, runs in {work}")
    return 0 if ok else 1
