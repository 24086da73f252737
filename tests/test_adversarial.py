"""What an adversarial run found (issue 14): readable data rejected as unreadable, non-finite settings, silent
changes, checkpoint rotation that loses work, disk and permission faults. Each test reproduces one case."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest

from flowers_ddpm.cli import main
from flowers_ddpm.config.sections import DataSettings
from flowers_ddpm.data.stream import build_train_batches, open_source
from flowers_ddpm.errors import UserError
from flowers_ddpm.training import checkpointing
from flowers_ddpm.training.stopping import EXIT_NONFINITE

from .conftest import make_class_folder, tiny_train_args


def run_main(capsys, args):
    code = main(args)
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- 1. readable data rejected as unreadable ---------------------------------------------------------------------
def mixed_folder(root: Path, good: int, bad: int) -> Path:
    """`good` readable images (of make_class_folder) plus `bad` text files named .png, in one folder."""
    make_class_folder(root / "src", per_class=good)
    folder = root / "mixed"
    (folder / "only").mkdir(parents=True)
    for i, path in enumerate(sorted(p for p in (root / "src").rglob("*") if p.is_file())[:good]):
        shutil.copyfile(path, folder / "only" / f"good{i}{path.suffix}")
    for i in range(bad):
        (folder / "only" / f"bad{i}.png").write_text("not a png")
    return folder


def batches_of(folder: Path, seed: int, buffer_size: int = 1000, batch_size: int = 1):
    data = DataSettings(train_data_dir=str(folder), resolution=8, shuffle_buffer_size=buffer_size)
    return build_train_batches(data, open_source(data), 0, 1, batch_size, seed)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 8])
def test_a_few_readable_images_among_bad_ones_train_with_the_default_shuffle_buffer(tmp_path, seed):
    # the buffer (1000) holds several epochs of 6 files before the first draw; the first draws may all be bad
    batches = batches_of(mixed_folder(tmp_path, good=2, bad=4), seed)
    assert len(list(itertools.islice(iter(batches), 20))) == 20


def test_a_resumed_stream_whose_next_example_is_bad_does_not_call_the_source_unreadable(tmp_path):
    folder = mixed_folder(tmp_path, good=1, bad=9)
    first = batches_of(folder, seed=0, buffer_size=30)
    iterator = iter(first)
    for _ in range(12):  # each resume point must resume without the error, whatever comes next
        next(iterator)
        resumed = batches_of(folder, seed=0, buffer_size=30)
        resumed.load_state_dict(checkpointing._decode(checkpointing._encode(first.state_dict())))
        next(iter(resumed))


def test_skipped_unreadable_images_are_counted_once_per_file(tmp_path):
    batches = batches_of(mixed_folder(tmp_path, good=2, bad=4), seed=0, buffer_size=4)
    list(itertools.islice(iter(batches), 40))  # many epochs: each bad file is drawn many times
    assert batches.skipped == 4
    resumed = batches_of(tmp_path / "mixed", seed=0, buffer_size=4)
    resumed.load_state_dict(batches.state_dict())  # the count travels with the checkpointed stream state
    assert resumed.skipped == 4


def test_a_source_where_nothing_can_be_read_is_still_an_error_with_the_default_buffer(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_text("not a png")
    with pytest.raises(UserError, match="none of the images .* could be read"):
        next(iter(batches_of(folder, seed=0)))


# -- 4. non-finite and out-of-range values ---------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(learning_rate="nan"), "learning_rate must be a finite number; got nan"),
    (dict(learning_rate="inf"), "learning_rate must be a finite number; got inf"),
    (dict(adam_epsilon="1e400"), "adam_epsilon must be a finite number; got inf"),
    (dict(snr_gamma="nan"), "snr_gamma must be a finite number"),
    (dict(sample_guidance_scale="inf"), "sample_guidance_scale must be a finite number"),
    (dict(max_grad_norm="nan"), "max_grad_norm must be a finite number"),
    (dict(ema_max_decay="1.5"), "ema_max_decay must be between 0 and 1"),
    (dict(adam_beta2="1"), "adam_beta2 must be >= 0 and < 1"),
    (dict(adam_beta1="-0.1"), "adam_beta1 must be >= 0"),
])
def test_non_finite_and_out_of_range_settings_are_refused_at_parse_time(capsys, image_folder, tmp_path, overrides,
                                                                         message):
    code, err = run_main(capsys, ["train", *tiny_train_args(image_folder, tmp_path / "out", **overrides)])
    assert code == 2 and message in error_line(err)
    assert not (tmp_path / "out").exists()


def test_a_yaml_nan_is_refused_like_a_flag(capsys, image_folder, tmp_path):
    config = tmp_path / "nan.yaml"
    config.write_text("model_preset: tiny\nvlb_weight: .nan\n")
    args = tiny_train_args(image_folder, tmp_path / "out")
    args[args.index("--config") + 1] = str(config)
    code, err = run_main(capsys, ["train", *args])
    assert code == 2 and "vlb_weight must be a finite number; got nan" in error_line(err)


@pytest.mark.parametrize("command, flags", [
    ("sample", ["--guidance_scale", "nan"]),
    ("sample", ["--guidance_scale", "-5"]),
    ("sample", ["--classifier_scale", "inf"]),
    ("evaluate", ["--guidance_scale", "nan"]),
    ("attach-classifier", ["--classifier_scale", "nan", "--classifier", "c", "--output", "o"]),
    ("attach-classifier", ["--guidance_scale", "-1", "--classifier", "c", "--output", "o"]),
])
def test_guidance_scales_must_be_finite_and_not_negative(capsys, tmp_path, command, flags):
    # refused before the model is even looked at (the model folder does not exist)
    code, err = run_main(capsys, [command, "--model", str(tmp_path / "nothing"), *flags])
    assert code == 2
    assert f"{flags[0]} must be a finite number >= 0; got {flags[1]}" in error_line(err)


@pytest.mark.slow
def test_weights_that_became_non_finite_are_never_checkpointed_or_exported(capsys, image_folder, tmp_path):
    # a finite but absurd learning rate: step 1 (warm-up, lr 0) is fine, step 2 turns every weight into NaN/Inf
    out = tmp_path / "out"
    code, err = run_main(capsys, ["train", *tiny_train_args(image_folder, out, learning_rate="1e38",
                                                            lr_scheduler="constant_with_warmup", lr_warmup_steps=1,
                                                            checkpointing_steps=1, max_train_steps=4)])
    assert code == EXIT_NONFINITE
    line = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert len(line) == 1 and "not finite" in line[0] and str(out / "checkpoints" / "checkpoint-1") in line[0]
    assert [step for step, _ in checkpointing.complete_checkpoints(out)] == [1]
    assert not (out / "pipeline").exists()
