"""Decode-once cache (same pixels as streaming, keyed so stale caches are never read, exact resume), the speed
options of the training step, and the benchmark command."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowers_ddpm.cli import main
from flowers_ddpm.config.loading import build_config
from flowers_ddpm.data.cache import CachedBatches, DecodedImages, cache_folder, open_cache
from flowers_ddpm.data.imaging import TransformSettings, crop_and_flip, decode_and_transform
from flowers_ddpm.data.stream import open_source
from flowers_ddpm.training.device import DeviceBatches

from .conftest import REPO, make_class_folder, resume_from_copy, run_command, tiny_train_args


def cache_config(folder, cache_dir, **overrides):
    values = dict(train_data_dir=str(folder), model_preset="tiny", resolution=16, max_train_steps=1,
                  decode_cache=True, decode_cache_dir=str(cache_dir))
    values.update(overrides)
    return build_config({}, values)


def read_order(path):
    """step -> ids of every micro-batch of that step."""
    order: dict = {}
    for entry in map(json.loads, path.read_text().splitlines()):
        order.setdefault(entry["step"], []).extend(entry["ids"])
    return order


def test_cached_images_augment_to_exactly_what_streaming_decodes(image_folder, tmp_path):
    for center_crop in (False, True):  # random crop: the cache holds short-side-resized images of varying width
        cfg = cache_config(image_folder, tmp_path, center_crop=center_crop, random_flip=True)
        source = open_source(cfg.data)
        images = open_cache(cfg.data, source)
        assert len(images) == 24 and images.skipped == 0 and images.in_ram
        records = {example["image"]["path"]: example["image"] for example in source.dataset}
        settings = TransformSettings(16, center_crop, True)
        for i, name in enumerate(images.ids):
            for key in range(3):
                cached = crop_and_flip(images.image(i), settings, np.random.default_rng(key))
                streamed = decode_and_transform(records[name], settings, np.random.default_rng(key))
                assert np.array_equal(cached, streamed)
        memory_mapped = DecodedImages(images.folder, ram_limit_bytes=0)
        assert not memory_mapped.in_ram and np.array_equal(memory_mapped.image(5), images.image(5))


def test_jpeg_draft_decodes_large_jpegs_at_reduced_scale_and_can_be_turned_off(tmp_path, monkeypatch):
    from PIL import Image

    from flowers_ddpm.data.imaging import decode_resized

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (16, 16, 3)), np.ones((32, 32, 1))).astype(np.uint8)  # 512x512 blocks
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    opened = []
    real_load = Image.Image.load

    def recording_load(image):  # the size the JPEG decoder actually produced
        opened.append(image.size)
        return real_load(image)

    monkeypatch.setattr(Image.Image, "load", recording_load)
    draft = decode_resized(str(tmp_path / "big.jpg"), TransformSettings(32, True, False))
    full = decode_resized(str(tmp_path / "big.jpg"), TransformSettings(32, True, False, jpeg_draft=False))
    assert opened[0] == (64, 64) and (512, 512) in opened  # draft: 1/8 DCT scale; off: full size
    assert draft.shape == full.shape == (32, 32, 3)
    assert np.abs(draft.astype(int) - full.astype(int)).mean() < 8  # the same picture either way


def test_a_changed_setting_or_file_never_reuses_a_cache(tmp_path):
    folder = make_class_folder(tmp_path / "images", per_class=3)
    base, _ = cache_folder(cache_config(folder, tmp_path / "c").data, open_source(cache_config(folder, tmp_path / "c").data))
    for change in (dict(resolution=8), dict(center_crop=True), dict(dataset_split="train")):
        cfg = cache_config(folder, tmp_path / "c", **change)
        assert cache_folder(cfg.data, open_source(cfg.data))[0] != base, change
    cfg = cache_config(folder, tmp_path / "c", random_flip=True, seed=5)  # per-step settings share the cache
    assert cache_folder(cfg.data, open_source(cfg.data))[0] == base

    open_cache(cfg.data, open_source(cfg.data))
    built = (base / "meta.json").stat().st_mtime_ns
    open_cache(cfg.data, open_source(cfg.data))
    assert (base / "meta.json").stat().st_mtime_ns == built  # reused, not rebuilt
    target = folder / "red" / "00.png"
    target.write_bytes(target.read_bytes() + b"\0")  # same name, new content
    assert cache_folder(cfg.data, open_source(cfg.data))[0] != base


def test_cached_batches_split_each_epoch_between_processes_and_resume_exactly(image_folder, tmp_path):
    cfg = cache_config(image_folder, tmp_path, random_flip=True)
    images = open_cache(cfg.data, open_source(cfg.data))
    settings = TransformSettings(16, False, True)

    def batches(rank, state=None):
        stream = CachedBatches(images, settings, batch_size=5, seed=1, rank=rank, world_size=2, record_ids=True)
        if state:
            stream.load_state_dict(state)
        return stream

    epoch0 = [set(batches(r).epoch_order(0)) for r in (0, 1)]
    assert epoch0[0].isdisjoint(epoch0[1]) and len(epoch0[0] | epoch0[1]) == 24
    assert list(batches(0).epoch_order(0)) != list(batches(0).epoch_order(1))  # reshuffled every epoch

    reference = batches(0)
    ref_batches = [batch for batch, _ in zip(reference, range(7))]  # 35 images: crosses into the third epoch
    for stop in (1, 3, 5):
        first = batches(0)
        iterator = iter(first)
        for _ in range(stop):
            next(iterator)
        resumed = batches(0, first.state_dict())
        for expected, got in zip(ref_batches[stop:], resumed):
            assert expected["ids"] == got["ids"]
            assert torch.equal(expected["pixel_values"], got["pixel_values"])
            assert torch.equal(expected["class_labels"], got["class_labels"])


def test_prepare_then_resume_with_the_cache_continues_the_same_run(image_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    flags = dict(max_train_steps=4, checkpointing_steps=2, log_data_order=True, gradient_accumulation_steps=2,
                 random_flip=True, train_batch_size=4, decode_cache=True, decode_cache_dir=str(cache_dir))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["prepare", *tiny_train_args(image_folder, straight, **flags)]) == 0
    (built,) = cache_dir.iterdir()
    built_at = (built / "meta.json").stat().st_mtime_ns
    assert main(["train", *tiny_train_args(image_folder, straight, **flags)]) == 0

    assert resume_from_copy(image_folder, straight, resumed, 2, **flags) == 0
    assert [p.name for p in cache_dir.iterdir()] == [built.name]
    assert (built / "meta.json").stat().st_mtime_ns == built_at  # both runs read the prepared cache

    straight_order = read_order(straight / "data_order" / "rank0.jsonl")
    resumed_order = read_order(resumed / "data_order" / "rank0.jsonl")
    assert sorted(resumed_order) == [3, 4]
    assert all(resumed_order[s] == straight_order[s] for s in resumed_order)
    epoch0 = [i for s in (1, 2, 3) for i in straight_order[s]][:24]  # the first epoch: every image once
    assert len(set(epoch0)) == 24
    a, b = straight / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4"
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_device_batches_are_channels_last_and_keep_the_data_position(image_folder, tmp_path):
    cfg = cache_config(image_folder, tmp_path)
    inner = CachedBatches(open_cache(cfg.data, open_source(cfg.data)), TransformSettings(16, False, False), 4, seed=0)
    batches = DeviceBatches(inner, torch.device("cpu"), channels_last=True)
    batch = next(iter(batches))
    assert batch["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and -1 <= batch["pixel_values"].min()
    assert batches.state_dict() == inner.state_dict() and batches.state_dict()["position"] == 4
    settings = TransformSettings(16, False, False)
    expected = [crop_and_flip(inner.images.image(i), settings, np.random.default_rng([0, 0, i]))
                for i in inner.epoch_order(0)[:4]]  # the same floats as the streaming path's conversion
    as_floats = torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(batch["pixel_values"], as_floats)


def test_gradient_checkpointing_gives_the_same_gradients():
    from flowers_ddpm.models.unet import build_unet
    from flowers_ddpm.training.device import prepare_model

    torch.manual_seed(0)
    plain = build_unet("tiny", 16)
    checkpointed = prepare_model(build_unet("tiny", 16), gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    for model in (plain, checkpointed):
        model.train()
        model(x, t).sample.square().mean().backward()
    assert checkpointed.is_gradient_checkpointing
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_benchmark_runs_a_tiny_config_and_writes_every_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--num_images", "8", "--image_size", "48", "--data_resolution", "16", "--resolution",
                 "16", "--train_batch_size", "2", "--warmup_steps", "1", "--steps", "1", "--rounds", "1",
                 "--sample_batch_size", "2", "--samplers", "ddpm=2,ddim=1,dpmsolver++=1", "--work_dir",
                 str(tmp_path), "--parts", "data,train,variants,sample", "--variants", "fp32,bf16-nchw",
                 "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    data, train, sample, variants = results["data"], results["train"], results["sample"], results["variants"]
    assert data["images"] == 8 and data["stream_images_per_sec"] > 0 and data["cache_images_per_sec"] > 0
    assert data["speedup"] == data["cache_images_per_sec"] / data["stream_images_per_sec"]
    for mode in ("baseline", "optimized"):
        assert train[mode]["images_per_sec"] > 0 and {"peak_memory_mb", "mfu", "precision"} <= set(train[mode])
    assert train["speedup"] > 0 and train["model_gflops_per_image"] > 0
    choice = train["optimized"]["precision_choice"]  # auto: timed as `train` times it, and what ran
    assert choice["setting"] == "auto" and choice["used"] == train["optimized"]["precision"]
    assert variants["timed_steps_per_variant"] == 1
    assert all(variants[name]["images_per_sec"] > 0 for name in ("fp32", "bf16-nchw"))
    assert all(sample[name]["images_per_sec"] > 0 for name in ("ddpm", "ddim", "dpmsolver++"))
    assert {"load_average_start", "load_average_end", "device"} <= set(results["machine"])
    table = capsys.readouterr().out
    assert "speedup" in table and "dpmsolver++" in table and "bf16-nchw" in table
    assert not [p for p in os.listdir(tmp_path) if p.startswith("flowers-ddpm-bench-")]  # temp files removed


@pytest.mark.slow
def test_the_gpu_check_script_runs_its_dry_run_on_a_cpu(tmp_path):
    out = tmp_path / "check.json"
    result = run_command(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry_run", "--device", "cpu", "--json",
                          str(out), "--work_dir", str(tmp_path / "work")], env={"PYTHON": sys.executable}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "installing" not in result.stderr  # the checkout's dependencies were there: nothing installed
    results = json.loads(out.read_text())
    assert results["suite"] == "gpu" and results["dry_run"] and results["plan"]["preset"] == "tiny"
    step = results["step"]
    assert all(step[name]["images_per_sec"] > 0 for name in ("fp32", "tf32", "bf16-nchw", "bf16"))
    assert step["model_gflops_per_image"] > 0
    adm = results["adm"]
    assert adm["class_conditional"] and adm["learn_sigma"] and adm["largest_batch"] == 4  # no OOM on a CPU
    assert all(results["sample"]["fp32"][name]["images_per_sec"] > 0 for name in ("ddpm", "ddim", "dpmsolver++"))
    train = results["train"]
    assert train["returncode"] == 0 and train["steps"] == 4 and train["images_per_sec"] > 0
    assert train["mixed_precision"]["used"] == "no" and train["ratio_to_bare_step"] > 0
    table = result.stdout
    assert "gpu check (dry run) on cpu" in table and "| adm |" in table and "| train |" in table
