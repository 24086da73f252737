"""The helpers that do a shared job once: atomic writes, the cache root, Hub ids, the decode pool, the run log,
markdown tables and class-label resolution."""

from __future__ import annotations

import threading

import pytest
from accelerate import Accelerator

from flowers_ddpm._util.atomic import atomic_file, atomic_files_into, atomic_folder, atomic_write_text
from flowers_ddpm._util.cache import cache_location, cache_root, folder_fingerprint
from flowers_ddpm._util.hub_ids import is_hub_id
from flowers_ddpm._util.tables import markdown_table
from flowers_ddpm.config.loading import build_config
from flowers_ddpm.data.cache import open_cache
from flowers_ddpm.data.decode_pool import decode_in_order
from flowers_ddpm.data.stream import open_source
from flowers_ddpm.errors import UserError
from flowers_ddpm.evaluation.reference import load_or_compute_reference
from flowers_ddpm.pipelines.conditioning import class_ids
from flowers_ddpm.publish import run_log
from tests.feature_nets import tiny_conv_net


class WriteFailed(Exception):
    pass


def test_a_file_write_that_fails_midway_keeps_the_old_file_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "result.json"
    atomic_write_text(path, "old")
    with pytest.raises(WriteFailed):
        with atomic_file(path) as tmp:
            tmp.write_text("half of the new")
            raise WriteFailed
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    atomic_write_text(path, "new", durable=True)
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_folder_write_that_fails_midway_keeps_the_old_folder_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "pipeline"
    with atomic_folder(path) as folder:
        (folder / "weights").write_text("old")
    with pytest.raises(WriteFailed):
        with atomic_folder(path) as folder:
            (folder / "weights").write_text("new")
            raise WriteFailed
    assert (path / "weights").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["pipeline"]


def test_a_folder_write_replaces_the_old_folder_and_clears_what_a_crash_left(tmp_path):
    path = tmp_path / "pipeline"
    path.mkdir()
    (path / "stale").write_text("old")
    for leftover in ("pipeline.tmp", "pipeline.old"):  # a killed write's remains
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "weights").write_text("partial")
    with atomic_folder(path) as folder:
        (folder / "weights").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]
    assert [p.name for p in path.iterdir()] == ["weights"] and (path / "weights").read_text() == "new"


def test_keep_existing_drops_the_second_copy(tmp_path):
    path = tmp_path / "cache"
    with atomic_folder(path, tmp_path / "cache.tmp-a", keep_existing=True) as folder:
        (folder / "pixels").write_text("first")
    with atomic_folder(path, tmp_path / "cache.tmp-b", keep_existing=True) as folder:
        (folder / "pixels").write_text("second")
    assert (path / "pixels").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_files_into_a_shared_folder_replace_only_their_namesakes(tmp_path):
    (tmp_path / "config.json").write_text("old")
    (tmp_path / "report").mkdir()
    with pytest.raises(WriteFailed):
        with atomic_files_into(tmp_path, "classifier.tmp") as staging:
            (staging / "config.json").write_text("half")
            raise WriteFailed
    assert (tmp_path / "config.json").read_text() == "old"
    with atomic_files_into(tmp_path, "classifier.tmp") as staging:
        (staging / "config.json").write_text("new")
        (staging / "model.safetensors").write_text("weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "report"]
    assert (tmp_path / "config.json").read_text() == "new"


def test_one_cache_root_for_every_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWERS_DDPM_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_location("decoded") == tmp_path / "home" / ".cache" / "flowers_ddpm" / "decoded"
    assert cache_location("reference") == tmp_path / "home" / ".cache" / "flowers_ddpm" / "reference"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "flowers_ddpm"
    monkeypatch.setenv("FLOWERS_DDPM_CACHE", str(tmp_path / "mine"))
    assert cache_location("decoded") == tmp_path / "mine" / "decoded"
    assert cache_location("decoded", str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"  # the setting wins


def test_the_decode_cache_and_the_reference_cache_honour_the_variable(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWERS_DDPM_CACHE", str(tmp_path / "caches"))
    cfg = build_config({}, dict(train_data_dir=str(image_folder), model_preset="tiny", resolution=16, center_crop=True,
                                max_train_steps=1, output_dir=str(tmp_path / "out")))
    images = open_cache(cfg.data, open_source(cfg.data))
    assert images.folder.parent == tmp_path / "caches" / "decoded"
    load_or_compute_reference(Accelerator(cpu=True), cfg.data, {"net": tiny_conv_net()}, max_images=4)
    assert [p.suffix for p in sorted((tmp_path / "caches" / "reference").iterdir())] == [".json", ".safetensors"]


def test_folder_fingerprint_changes_when_a_file_changes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"1")
    before = folder_fingerprint(tmp_path)
    assert folder_fingerprint(tmp_path) == before
    (tmp_path / "a" / "x.png").write_bytes(b"22")
    assert folder_fingerprint(tmp_path) != before


def test_hub_ids_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "pipeline").mkdir(parents=True)
    assert is_hub_id("google/ddpm-cifar10-32") and is_hub_id("someone/missing-model") and is_hub_id("gpt2")
    assert not is_hub_id("gpt2", namespaced=True)
    for local in ("runs/pipeline", "./model", "/abs/model", "~/model", "does/not/exist/here", "a b/c", "", None):
        assert not is_hub_id(local), local


@pytest.mark.parametrize("num_workers", [0, 3])
def test_the_decode_pool_keeps_stream_order_and_a_bounded_window(num_workers):
    pulled, threads = [], set()

    def jobs():
        for i in range(40):
            pulled.append(i)
            yield f"ctx{i}", (i,)

    def decode(i):
        threads.add(threading.current_thread().name)
        return i * i

    results = []
    for context, value in decode_in_order(decode, jobs(), num_workers, window=5, thread_name_prefix="test-decode"):
        results.append((context, value))
        assert len(pulled) - len(results) <= 5  # never more than the window submitted ahead of the consumer
    assert results == [(f"ctx{i}", i * i) for i in range(40)]
    assert all(name.startswith("test-decode") for name in threads) == (num_workers > 0)


def test_the_run_log_keeps_the_later_record_of_a_step_logged_twice(tmp_path):
    (tmp_path / "report").mkdir()
    for step, loss in ((1, 0.9), (2, 0.8), (3, 0.7), (2, 0.6), (3, 0.5), (4, 0.4)):  # resumed from step 1
        run_log.append_record(tmp_path, {"step": step, "loss": loss})
    assert run_log.loss_curve(tmp_path) == ([1, 2, 3, 4], [0.9, 0.6, 0.5, 0.4])
    assert run_log.read_records(tmp_path / "nothing") == []


def test_markdown_table():
    rows = [{"name": "a", "value": 1.0}, {"name": "b", "value": None}]
    table = markdown_table(rows, [("name", "sampler"), ("value", "FID")],
                           lambda key, value: "-" if value is None else str(value), right_aligned=["value"])
    assert table == "| sampler | FID |\n| --- | ---: |\n| a | 1.0 |\n| b | - |\n"


def test_class_labels_by_index_digit_string_or_name():
    names = ["Pink Primrose", "sunflower"]
    assert class_ids([1, "0", " SUNFLOWER ", "pink primrose"], names, 2) == [1, 0, 1, 0]
    with pytest.raises(UserError, match="unknown class 'rose'; classes are pink primrose, sunflower"):
        class_ids(["rose"], names, 2)
    with pytest.raises(UserError, match="class index 2 is out of range for 2 classes"):
        class_ids(["2"], names, 2)
