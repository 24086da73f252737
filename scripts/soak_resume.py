"""Soak test of crash-safe resume: interrupt one training run many times (SIGKILL at random moments, during
saves and at start-up, plus some SIGTERM/SIGINT), resume it with the same command each time, and compare its
final weights, EMA, optimizer state and data order with an uninterrupted run.

    python scripts/soak_resume.py --kills 50 --seed 0 [--workdir DIR]

Prints the counts and exits 0 only when every resume succeeded and the final state matches.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import make_class_folder, tiny_train_args  # noqa: E402
from tests.kill_harness import MODES, interrupt_and_resume, read_data_order  # noqa: E402
from tests.test_kill_resume import assert_same_final_state  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs to deliver")
    parser.add_argument("--signals", type=int, default=4, help="SIGTERM/SIGINT stops to deliver as well")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    kill_modes = [m for m in MODES if m not in ("sigterm", "sigint")]
    modes = [rng.choice(kill_modes) for _ in range(args.kills)] + [rng.choice(["sigterm", "sigint"])
                                                                    for _ in range(args.signals)]
    rng.shuffle(modes)
    # only random/sigterm/sigint interruptions let steps complete, at most ~2 each: every one lands before the end
    steps = 2 * sum(m in ("random", "sigterm", "sigint") for m in modes) + 4
    work = Path(args.workdir or tempfile.mkdtemp(prefix="soak_resume_"))
    data = make_class_folder(work / "images")
    flags = dict(max_train_steps=steps, checkpointing_steps=1, checkpoints_total_limit=2, log_data_order=True,
                 random_flip=True, shuffle_buffer_size=10, train_batch_size=3, logger="none")
    straight, interrupted = work / "straight", work / "interrupted"

    from flowers_ddpm.cli import main as cli

    started = time.monotonic()
    if cli(["train", *tiny_train_args(data, straight, **flags)]) != 0:
        print("the uninterrupted run failed")
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
    print(f"steps: {steps}, interruptions: {len(modes)} ({', '.join(f'{m}={modes.count(m)}' for m in sorted(set(modes)))})")
    print(f"SIGKILLs delivered: {report.kills} (of which left a half-written checkpoint: {report.kills_during_save})")
    print(f"SIGTERM/SIGINT: {report.signals}, clean stops with exit code 75 and a checkpoint: {report.clean_stops}, "
          f"slowest stop: {max(report.stop_seconds, default=0):.1f} s")
    print(f"restarts from a checkpoint: {report.resumes}, of which loaded it and trained on (the others were killed "
          f"before or while loading): {report.resumes_loaded}; every restart ran until we interrupted it or finished")
    print(f"final weights, EMA, optimizer state and data order match the uninterrupted run: {match}")
    print(f"wall time: {time.monotonic() - started:.0f} s, runs in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
