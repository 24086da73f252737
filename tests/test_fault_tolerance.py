"""Fault tolerance: damaged checkpoints, refused resumes, non-finite losses, bad files, preemption of 2 processes."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flowers_ddpm.cli import main
from flowers_ddpm.data.stream import TrainBatches
from flowers_ddpm.errors import UserError
from flowers_ddpm.experiments.soak import assert_same_final_state, read_data_order
from flowers_ddpm.training import checkpointing
from flowers_ddpm.training.stopping import EXIT_NONFINITE, EXIT_PREEMPTED

from .conftest import REPO, free_port, make_class_folder, tiny_train_args

SECRET = "hf_fault_tolerance_test_token_4242"


def weights(checkpoint, name="model.safetensors"):
    return load_file(checkpoint / name)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-step run with a checkpoint after every step (copied by tests that damage it)."""
    root = tmp_path_factory.mktemp("ft")
    data = make_class_folder(root / "images")
    out = root / "run"
    assert main(["train", *tiny_train_args(data, out, max_train_steps=3, checkpointing_steps=1,
                                           checkpoints_total_limit=10)]) == 0
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return data, out


def test_damaged_checkpoints_are_skipped_by_latest_and_refused_by_name(finished_run, tmp_path, caplog):
    data, original = finished_run
    out = tmp_path / "run"
    shutil.copytree(original, out)
    ckpts = out / "checkpoints"
    assert {p.name for p in (ckpts / "checkpoint-3").iterdir()} >= {
        "MANIFEST.json", "COMPLETE", "model.safetensors", "ema.safetensors", "trainer_state.json",
        "data_state_rank0.json", "training_config.json", "optimizer.bin", "random_states_0.pkl"}
    from accelerate.utils.other import load as accelerate_load  # what load_state uses: weights_only=True

    pickles = {p.name for p in ckpts.rglob("*") if p.suffix in (".pkl", ".bin", ".pt", ".pth")}
    assert pickles == {"random_states_0.pkl", "optimizer.bin"}  # the only pickles are accelerate's ...
    for name in pickles:  # ... and they load without executing code
        accelerate_load(ckpts / "checkpoint-3" / name, weights_only=True)

    model = ckpts / "checkpoint-3" / "model.safetensors"
    raw = bytearray(model.read_bytes())
    raw[-1] ^= 0xFF  # same size, different content
    model.write_bytes(bytes(raw))
    with open(ckpts / "checkpoint-2" / "optimizer.bin", "r+b") as f:
        f.truncate(100)
    shutil.copytree(ckpts / "checkpoint-1", ckpts / "checkpoint-9")  # renamed copy: manifest fine, but ...
    (ckpts / "checkpoint-9" / "MANIFEST.json").unlink()  # ... a checkpoint without manifest is not trusted
    (ckpts / "checkpoint-7.tmp").mkdir()  # a save cut short

    with caplog.at_level("WARNING"):
        assert checkpointing.resolve_resume_path(out, "latest") == ckpts / "checkpoint-1"
    text = caplog.text
    assert "checkpoint-9" in text and "MANIFEST.json" in text
    assert "checkpoint-3" in text and "model.safetensors does not match its sha256" in text
    assert "checkpoint-2" in text and "optimizer.bin has 100 bytes" in text
    with pytest.raises(UserError, match="checkpoint-3 is not a complete, intact checkpoint: model.safetensors"):
        checkpointing.resolve_resume_path(out, "checkpoint-3")

    # end to end: `latest` resumes from checkpoint-1; max_train_steps and intervals may change on resume
    assert main(["train", *tiny_train_args(data, out, resume_from_checkpoint="latest", max_train_steps=4,
                                           checkpointing_steps=2, logging_steps=1, checkpoints_total_limit=10)]) == 0
    assert "resumed from" in caplog.text and "checkpoint-1 at step 1" in caplog.text
    checkpointing.verify_checkpoint(ckpts / "checkpoint-4")
    assert not (ckpts / "checkpoint-7.tmp").exists()  # stale partial saves are cleaned up by the next save


def test_resume_with_a_different_model_is_refused_before_anything_changes(finished_run, capsys):
    data, out = finished_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code = main(["train", *tiny_train_args(data, out, resume_from_checkpoint="latest", max_train_steps=5,
                                           resolution=32, prediction_type="v_prediction")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert "resolution (checkpoint: 16, now: 32)" in err and "prediction_type (checkpoint: 'epsilon'" in err
    assert "model_preset" not in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written, nothing deleted


def test_nonfinite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(image_folder, tmp_path, monkeypatch,
                                                                         caplog, capsys):
    poisoned_steps = {3, 5, 6}
    original_iter = TrainBatches.__iter__

    def poisoned(self):
        for step, batch in enumerate(original_iter(self), start=1):
            if step in poisoned_steps:
                batch["pixel_values"][0, 0, 0, 0] = float("nan")
            yield batch

    monkeypatch.setattr(TrainBatches, "__iter__", poisoned)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = tmp_path / "nan"
    with caplog.at_level("WARNING"):
        code = main(["train", *tiny_train_args(image_folder, out, max_train_steps=8, checkpointing_steps=1,
                                               checkpoints_total_limit=10, max_consecutive_nonfinite=2, logger="tensorboard", logging_steps=1)])
    assert code == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "stopped at step 6: 2 consecutive steps had a non-finite loss or gradient" in err
    assert "step 3: non-finite loss or gradient; update skipped (1 in a row, 1 in total)" in caplog.text

    ckpt = {s: out / "checkpoints" / f"checkpoint-{s}" for s in range(1, 6)}
    assert not (out / "checkpoints" / "checkpoint-6").exists()  # the run stopped without saving the bad step
    for step in ckpt:
        checkpointing.verify_checkpoint(ckpt[step])  # every checkpoint on disk is intact
    for name in ("model.safetensors", "ema.safetensors"):
        assert same(weights(ckpt[3], name), weights(ckpt[2], name))  # step 3 skipped
        assert not same(weights(ckpt[4], name), weights(ckpt[3], name))  # step 4 trained
        assert same(weights(ckpt[5], name), weights(ckpt[4], name))  # step 5 skipped
    assert all(torch.isfinite(t).all() for t in weights(ckpt[5]).values())
    state = json.loads((ckpt[5] / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 2 and state["progress"]["global_step"] == 5
    assert_no_secret(out)


def assert_no_secret(folder):
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb as Pillow sees it)."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def test_bad_files_are_skipped_with_one_warning_and_odd_ones_converted(tmp_path, monkeypatch, caplog):
    folder = make_class_folder(tmp_path / "images", per_class=2)
    red, blue = folder / "red", folder / "blue"
    (red / "truncated.jpg").write_bytes((red / "01.jpg").read_bytes()[:60])
    (red / "empty.png").write_bytes(b"")
    (blue / "notes.png").write_text("this is a text file, not a PNG")
    (blue / "bomb.png").write_bytes(png_with_header_size(100_000, 100_000))  # over twice Pillow's limit
    Image.new("RGB", (40, 40), (9, 9, 9)).save(red / "big.png")  # over our lowered limit, under twice it
    Image.new("RGB", (1, 1), (200, 10, 10)).save(red / "one_pixel.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(red / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(blue / "sixteen_bit.png")
    Image.new("LA", (20, 20), (90, 128)).save(blue / "gray_alpha.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 = 1,600 pixels

    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert main(["train", *tiny_train_args(folder, out, max_train_steps=6, checkpointing_steps=100,
                                               shuffle_buffer_size=1, log_data_order=True)]) == 0
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    for name in ("truncated.jpg", "empty.png", "notes.png", "bomb.png", "big.png"):
        assert sum(name in w for w in warnings) == 1, (name, warnings)  # named once, whatever the epochs
    assert any("bomb.png" in w and "decompression" in w.lower() for w in warnings)
    assert any("big.png" in w and "decompression-bomb limit of 1000" in w for w in warnings)
    assert "process 0 skipped" in caplog.text
    trained = {i.rsplit("/", 1)[-1] for ids in read_data_order(out / "data_order" / "rank0.jsonl").values()
               for i in ids}
    assert trained == {"00.png", "01.jpg", "one_pixel.png", "cmyk.jpg", "sixteen_bit.png", "gray_alpha.png"}
    assert (out / "pipeline" / "model_index.json").is_file()


def launch_two(args: list[str], env: dict | None = None) -> subprocess.Popen:
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(REPO / "scripts" / "train.py"), *args]
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONPATH": pythonpath, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.Popen(command, env=full_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def rank_process(launcher: subprocess.Popen, rank: int, timeout: float = 120):
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "train.py" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise TimeoutError(f"no rank {rank} process")


@pytest.mark.slow
def test_two_processes_stop_together_on_sigterm_and_resume_exactly(image_folder, tmp_path):
    # constant LR: the preempted run may use a larger max_train_steps (safe to change on resume) without
    # changing the schedule, so that the signal surely lands before its end
    flags = dict(checkpointing_steps=2, log_data_order=True, lr_scheduler="constant", random_flip=True)
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    reference = launch_two(tiny_train_args(image_folder, straight, max_train_steps=8, **flags))

    run = launch_two(tiny_train_args(image_folder, preempted, max_train_steps=1000, **flags), env={"HF_TOKEN": SECRET})
    worker = rank_process(run, 1)
    deadline = time.monotonic() + 300
    while checkpointing.complete_checkpoints(preempted) == [] and time.monotonic() < deadline:
        time.sleep(0.05)
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)  # SIGTERM to rank 1 only: rank 0 must stop at the same step
    _, err = run.communicate(timeout=300)
    assert time.monotonic() - signalled < 60
    stops = re.findall(r"stopped: preempted by (.+?) at step (\d+);", err)  # lines may follow tqdm's \r
    assert len(stops) == 2, err[-3000:]
    assert {who for who, _ in stops} == {"SIGTERM", "a signal on another process"}
    steps = {step for _, step in stops}
    assert len(steps) == 1, stops  # both ranks stopped after the same step
    # the launcher reports the first rank's exit code; it may terminate the other rank before that one exits
    assert f"exitcode  : {EXIT_PREEMPTED}" in err and run.returncode != 0
    stop_step = int(steps.pop())
    assert checkpointing.complete_checkpoints(preempted)[-1][0] == stop_step < 8
    assert_no_secret(preempted)

    resumed = launch_two(tiny_train_args(image_folder, preempted, max_train_steps=8,
                                         resume_from_checkpoint="latest", **flags))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    assert_same_final_state(straight / "checkpoints" / "checkpoint-8", preempted / "checkpoints" / "checkpoint-8")
    for rank in (0, 1):
        name = f"data_order/rank{rank}.jsonl"
        assert read_data_order(preempted / name) == read_data_order(straight / name)
