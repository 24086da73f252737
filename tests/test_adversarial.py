"""What an adversarial run found (issue 14): readable data rejected as unreadable, non-finite settings, silent
changes, checkpoint rotation that loses work, disk and permission faults. Each test reproduces one case."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest

from flowers_ddpm.config.sections import DataSettings
from flowers_ddpm.data.stream import build_train_batches, open_source
from flowers_ddpm.errors import UserError
from flowers_ddpm.training import checkpointing

from .conftest import make_class_folder


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
