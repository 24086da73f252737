"""Crash safety: a run interrupted by SIGKILL (also during a save), SIGTERM and SIGINT, resumed each time with the
same command, ends with exactly the weights, optimizer state and data order of an uninterrupted run."""

from __future__ import annotations

import pytest

from flowers_ddpm.cli import main
from flowers_ddpm.experiments.soak import assert_same_final_state, interrupt_and_resume, read_data_order

from .conftest import tiny_train_args

FLAGS = dict(max_train_steps=24, checkpointing_steps=1, checkpoints_total_limit=2, log_data_order=True,
             random_flip=True, shuffle_buffer_size=10, train_batch_size=3, dataloader_num_workers=2)


@pytest.mark.slow
def test_kills_and_signals_at_random_moments_then_resume_gives_the_uninterrupted_result(image_folder, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["train", *tiny_train_args(image_folder, straight, **FLAGS)]) == 0

    args = tiny_train_args(image_folder, interrupted, resume_from_checkpoint="latest", **FLAGS)
    modes = ["during_save", "random", "startup", "during_save", "random", "sigterm", "sigint"]
    report = interrupt_and_resume(args, interrupted, modes, seed=1)
    log = interrupted.with_suffix(".log").read_text()
    assert report.kills == 5 and report.kills_during_save >= 1, (report, log[-3000:])
    assert report.signals == 2 and report.clean_stops == 2, (report, log[-3000:])  # exit 75, checkpoint of that step
    assert max(report.stop_seconds) < 60
    assert report.resumes >= 5

    final = interrupted / "checkpoints" / "checkpoint-24"
    assert sorted(p.name for p in final.parent.iterdir()) == ["checkpoint-23", "checkpoint-24"]  # rotation, no .tmp
    assert_same_final_state(straight / "checkpoints" / "checkpoint-24", final)
    order = read_data_order(interrupted / "data_order" / "rank0.jsonl")
    assert order == read_data_order(straight / "data_order" / "rank0.jsonl")
