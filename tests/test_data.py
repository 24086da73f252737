"""Image conversion and the resumable, sharded example stream."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from flowers_ddpm.config.loading import build_config
from flowers_ddpm.config.sections import DataSettings
from flowers_ddpm.data.cache import cache_folder, open_cache
from flowers_ddpm.data.imaging import TransformSettings, decode_and_transform
from flowers_ddpm.data.stream import ResumableStream, example_id, hold_out, open_source


def encoded(image: Image.Image, fmt: str) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.mark.parametrize("make", [
    lambda: Image.new("L", (40, 30), 128),
    lambda: Image.new("RGBA", (40, 30), (255, 0, 0, 0)),
    lambda: Image.new("P", (40, 30), 3),
    lambda: Image.new("CMYK", (40, 30), (0, 255, 255, 0)),
    lambda: Image.fromarray(np.full((30, 40), 65535, np.uint16)),
    lambda: Image.new("RGB", (1, 1), (1, 2, 3)),
])
def test_every_mode_becomes_rgb_at_the_training_size(make):
    image = make()
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    array = decode_and_transform(encoded(image, fmt), TransformSettings(16, True, False), np.random.default_rng(0))
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8


def test_transparent_pixels_become_white_and_16_bit_is_scaled():
    settings = TransformSettings(8, True, False)
    rgba = decode_and_transform(encoded(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG"), settings,
                                np.random.default_rng(0))
    assert (rgba == 255).all()
    wide = decode_and_transform(encoded(Image.fromarray(np.full((8, 8), 65535, np.uint16)), "PNG"), settings,
                                np.random.default_rng(0))
    assert (wide == 255).all()


def test_random_crop_and_flip_depend_only_on_the_key():
    gradient = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1)).astype(np.uint8)).convert("RGB")
    record, settings = encoded(gradient, "PNG"), TransformSettings(16, False, True)
    crops = {decode_and_transform(record, settings, np.random.default_rng([0, 0, k])).tobytes() for k in range(8)}
    again = {decode_and_transform(record, settings, np.random.default_rng([0, 0, k])).tobytes() for k in range(8)}
    assert crops == again and len(crops) > 1


def open_folder(folder):
    return open_source(build_config({}, {"train_data_dir": str(folder), "model_preset": "tiny", "resolution": 16,
                                         "max_train_steps": 1}).data)


def take(stream, n):
    iterator = iter(stream)
    return [next(iterator)["image"]["path"] for _ in range(n)]


def test_stream_state_resumes_exactly_across_epochs(image_folder):
    source = open_folder(image_folder)
    assert source.image_column == "image" and source.label_column == "label"
    assert source.class_names == ["blue", "red"] and source.num_examples == 24
    reference = take(ResumableStream(source.dataset, seed=3, buffer_size=7), 60)  # 2.5 epochs
    assert sorted(reference[:24]) != reference[:24]  # shuffled
    for stop in (5, 24, 30):
        first = ResumableStream(source.dataset, seed=3, buffer_size=7)
        iterator = iter(first)
        head = [next(iterator)["image"]["path"] for _ in range(stop)]
        state = first.state_dict()
        second = ResumableStream(open_folder(image_folder).dataset, seed=3, buffer_size=7)
        second.load_state_dict(state)
        assert head + take(second, 60 - stop) == reference


def take_examples(stream, n):
    iterator = iter(stream)
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("stop", [0, 5, 24, 30])
def test_an_epoch_that_fits_the_buffer_is_a_new_permutation_each_epoch_and_resumes_exactly(image_folder, stop):
    source = open_folder(image_folder)
    reference = take_examples(ResumableStream(source.dataset, seed=3, buffer_size=24), 72)  # 3 epochs, 24 images
    paths = [e["image"]["path"] for e in reference]
    epochs = [paths[k * 24:(k + 1) * 24] for k in range(3)]
    assert all(sorted(epoch) == sorted(set(paths)) for epoch in epochs)  # every image once per epoch
    assert len({tuple(epoch) for epoch in epochs}) == 3 and sorted(epochs[0]) != epochs[0]  # a new order each time
    # the folder streams sorted by class (blue, then red); every epoch's first half holds both classes
    assert all(len({e["label"] for e in reference[k * 24:k * 24 + 12]}) == 2 for k in range(3))
    first = ResumableStream(open_folder(image_folder).dataset, seed=3, buffer_size=24)
    head = [e["image"]["path"] for e in take_examples(first, stop)] if stop else []
    state = first.state_dict()
    assert state["exact"] is (True if stop else None) and not state["buffer"]  # no records in the checkpoint
    second = ResumableStream(open_folder(image_folder).dataset, seed=3, buffer_size=24)
    second.load_state_dict(state)
    assert head + take(second, 72 - stop) == paths
    other_seed = take(ResumableStream(source.dataset, seed=4, buffer_size=24), 24)
    assert other_seed != epochs[0] and sorted(other_seed) == sorted(epochs[0])


def test_a_buffer_smaller_than_an_epoch_still_resumes_from_a_state_written_before_the_exact_shuffle(image_folder):
    source = open_folder(image_folder)
    reference = take(ResumableStream(source.dataset, seed=3, buffer_size=7), 40)
    first = ResumableStream(source.dataset, seed=3, buffer_size=7)
    head = take(first, 10)
    state = first.state_dict()
    assert state["exact"] is False and len(state["buffer"]) == 7
    old = {k: v for k, v in state.items() if k not in ("exact", "position")}  # the keys of earlier checkpoints
    second = ResumableStream(open_folder(image_folder).dataset, seed=3, buffer_size=7)
    second.load_state_dict(old)
    assert head + take(second, 30) == reference


def test_a_buffer_of_one_keeps_the_stream_order(image_folder):
    source = open_folder(image_folder)
    paths = take(ResumableStream(source.dataset, seed=3, buffer_size=1), 24)
    assert paths[:23] == [e["image"]["path"] for e in source.dataset][:23]


def test_processes_get_disjoint_shards(image_folder):
    source = open_folder(image_folder)
    for buffer_size in (1, 100):  # a buffer, and the exact shuffle
        shards = [set(take(ResumableStream(source.dataset, 0, buffer_size, rank=r, world_size=2), 12))
                  for r in (0, 1)]
        assert shards[0].isdisjoint(shards[1]) and len(shards[0] | shards[1]) == 24


def test_a_held_out_sample_leaves_the_stream_and_the_decode_cache(image_folder, tmp_path):
    data = DataSettings(train_data_dir=str(image_folder), resolution=16, decode_cache_dir=str(tmp_path / "cache"))
    source = open_source(data)
    kept = hold_out(source, 4, seed=0)
    assert len(kept.held_out) == 4 and kept.num_examples == source.num_examples - 4
    streamed = [example_id(example[kept.image_column]) for example in kept.dataset]
    assert len(streamed) == source.num_examples - 4 and not set(streamed) & kept.held_out
    assert hold_out(source, 4, seed=0).held_out == kept.held_out  # fixed by the seed
    assert cache_folder(data, kept)[0] != cache_folder(data, source)[0]  # never the full folder's cache
    assert len(open_cache(data, kept)) == source.num_examples - 4
