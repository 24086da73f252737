"""What an adversarial run found (issue 14): readable data rejected as unreadable, non-finite settings, silent
changes, checkpoint rotation that loses work, disk and permission faults. Each test reproduces one case."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from flowers_ddpm.cli import main
from flowers_ddpm.config.sections import DataSettings
from flowers_ddpm.data.imaging import TransformSettings, decode_and_transform
from flowers_ddpm.data.stream import build_train_batches, open_source
from flowers_ddpm.errors import EXIT_STORAGE, UserError
from flowers_ddpm.models.unet import build_noise_scheduler, build_unet
from flowers_ddpm.pipelines.export import export_pipeline
from flowers_ddpm.training import checkpointing
from flowers_ddpm.training import stopping
from flowers_ddpm.training.stopping import (EXIT_NONFINITE, EXIT_PREEMPTED, InterruptOnSigterm, SignalStop,
                                           StopOutsideSteps)

from .conftest import REPO, make_class_folder, tiny_train_args


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


def batches_of(folder: Path, seed: int, buffer_size: int | None = None, batch_size: int = 1):
    data = DataSettings(train_data_dir=str(folder), resolution=8,
                        **({"shuffle_buffer_size": buffer_size} if buffer_size else {}))
    return build_train_batches(data, open_source(data), 0, 1, batch_size, seed)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 8])
def test_a_few_readable_images_among_bad_ones_train_with_the_default_shuffle_buffer(tmp_path, seed):
    # the 6 files fit the default buffer, so each epoch is a new permutation of them; the first draws may all be bad
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


# -- 5. things that changed without a word ---------------------------------------------------------------------------
@pytest.mark.slow
def test_fp16_on_the_cpu_says_it_trains_in_fp32_and_records_what_ran(caplog, image_folder, tmp_path):
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert main(["train", *tiny_train_args(image_folder, out, mixed_precision="fp16", max_train_steps=1)]) == 0
    assert "mixed_precision fp16" in caplog.text and "fp32" in caplog.text
    for recorded in (out / "training_config.yaml", out / "pipeline" / "training_config.yaml"):
        assert yaml.safe_load(recorded.read_text())["mixed_precision"] == "no"


@pytest.mark.slow
def test_a_checkpoint_whose_random_state_cannot_be_restored_is_not_resumed_silently(capsys, image_folder, tmp_path):
    out = tmp_path / "out"
    assert main(["train", *tiny_train_args(image_folder, out, max_train_steps=2, checkpointing_steps=1)]) == 0
    # as written by another accelerate version or device: a valid pickle without the numpy state; the manifest
    # is rewritten to match, so only the content is wrong
    checkpoint = out / "checkpoints" / "checkpoint-2"
    rng = checkpoint / "random_states_0.pkl"
    states = torch.load(rng, weights_only=False)
    del states["numpy_random_seed"]
    torch.save(states, rng)
    (checkpoint / checkpointing.MANIFEST).unlink()
    checkpointing.write_manifest(checkpoint)
    checkpointing.verify_checkpoint(checkpoint)
    capsys.readouterr()
    code = main(["train", *tiny_train_args(image_folder, out, max_train_steps=3, checkpointing_steps=1,
                                           resume_from_checkpoint="latest")])
    line = error_line(capsys.readouterr().err)
    assert code == 2 and "random_states_0.pkl" in line and "checkpoint-2" in line
    assert not (out / "checkpoints" / "checkpoint-3").exists()


def png16(values: np.ndarray) -> dict:
    buffer = io.BytesIO()
    image = Image.fromarray(values.astype(np.uint16))
    assert image.mode.startswith("I;16")
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def test_16_bit_images_are_converted_by_their_real_range():
    settings = TransformSettings(8, True, False)
    ramp = np.linspace(82, 224, 64).reshape(8, 8).round()
    low = decode_and_transform(png16(ramp), settings, np.random.default_rng(0))[..., 0]
    assert abs(int(low.min()) - 82) <= 1 and abs(int(low.max()) - 224) <= 1  # 8-bit values in a 16-bit file
    wide = decode_and_transform(png16(ramp * 257), settings, np.random.default_rng(0))[..., 0]
    assert abs(int(wide.min()) - 82) <= 1 and abs(int(wide.max()) - 224) <= 1  # full 16-bit range
    assert (decode_and_transform(png16(np.full((8, 8), 40000)), settings, np.random.default_rng(0)) == 156).all()


def python_env() -> dict:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath}


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (Linux: the SigCgt mask in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:  # it has ended
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.slow
def test_sigterm_while_the_command_is_still_loading_says_so_and_exits_75(image_folder, tmp_path):
    # the `flowers-ddpm` entry point: the imports alone take seconds, so this lands before the first step
    process = subprocess.Popen([sys.executable, "-m", "flowers_ddpm", "train",
                                *tiny_train_args(image_folder, tmp_path / "out")],
                               env=python_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # once the process catches SIGTERM (its start-up handling is in place): a fixed sleep raced the interpreter's
    # own start-up on a loaded machine, where the default handler would still end it by the signal
    deadline = time.monotonic() + 60
    while not catches(process.pid, signal.SIGTERM) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, err
    last = err.strip().splitlines()[-1]  # while cli loads, or while the train command imports its stages
    assert last.startswith("stopped: stopped by SIGTERM") and "during start-up" in last


SIGNAL_HANDLINGS = [(lambda: StopOutsideSteps("while testing", "rerun"), SignalStop),
                    (InterruptOnSigterm, KeyboardInterrupt)]


def _module_that_signals_itself(folder: Path, name: str) -> None:
    # SIGTERM lands in the middle of the module's own import; the rest of the module still has to run
    (folder / f"{name}.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\n"
                                       "time.sleep(0.3)\nFINISHED = True\n")


@pytest.mark.parametrize("handling, raised", SIGNAL_HANDLINGS)
def test_a_signal_inside_an_import_stops_once_the_import_is_done(handling, raised, tmp_path, monkeypatch):
    # raised inside the import it would leave a half-initialised module (under xdist's load a SIGTERM once landed
    # in numpy's lazy `import numpy.dtypes`: a RecursionError and exit 1 instead of the stop and 75)
    name = f"signals_itself_{raised.__name__.lower()}"
    _module_that_signals_itself(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(raised):
        with handling():
            __import__(name)
            time.sleep(5)  # the redelivered signal interrupts this at once
    assert sys.modules[name].FINISHED is True
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_signal_still_pending_when_the_block_ends_stops_at_its_end(tmp_path, monkeypatch):
    monkeypatch.setattr(stopping._RaiseOutsideImports, "RETRY_S", 30.0)  # no redelivery within the test
    _module_that_signals_itself(tmp_path, "signals_itself_at_the_end")
    monkeypatch.syspath_prepend(str(tmp_path))
    previous = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    with pytest.raises(SignalStop, match="stopped by SIGTERM while testing; rerun"):
        with StopOutsideSteps("while testing", "rerun"):
            __import__("signals_itself_at_the_end")
    assert time.monotonic() - started < 10
    assert sys.modules["signals_itself_at_the_end"].FINISHED is True
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.slow
def test_sigterm_during_the_run_set_up_says_so_and_exits_75(image_folder, tmp_path):
    # the signal arrives while the data source is being opened (after the imports, before the first step)
    code = (
        "import os, signal, sys\n"
        "from flowers_ddpm.training import run_setup\n"
        "from flowers_ddpm.cli import main\n"
        "real = run_setup.open_source\n"
        "def open_source(data):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(data)\n"
        "run_setup.open_source = open_source\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, "train", *tiny_train_args(image_folder, tmp_path / "out")],
                            env=python_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_PREEMPTED, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: stopped by SIGTERM") and "--resume_from_checkpoint latest" in last
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_after_the_final_checkpoint_stops_before_the_export_and_a_resume_exports(capsys, monkeypatch,
                                                                                          image_folder, tmp_path):
    out = tmp_path / "out"
    real_save = checkpointing.save_checkpoint

    def save_then_signal(accelerator, output_dir, step, *args, **kwargs):
        path = real_save(accelerator, output_dir, step, *args, **kwargs)
        if step == 4:  # the final checkpoint: the run would now sample and export
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_signal)
    args = tiny_train_args(image_folder, out, max_train_steps=4, checkpointing_steps=2)
    code, err = run_main(capsys, ["train", *args])
    assert code == EXIT_PREEMPTED
    stopped = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and "checkpoint-4" in stopped[0] and "export" in stopped[0]
    assert not (out / "pipeline").exists()
    monkeypatch.setattr(checkpointing, "save_checkpoint", real_save)
    assert main(["train", *args, "--resume_from_checkpoint", "latest"]) == 0
    assert (out / "pipeline" / "model_index.json").is_file()


def test_a_hub_id_while_offline_says_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_main(capsys, ["sample", "--model", "nobody/no-such-pipeline", "--output", str(tmp_path / "g.png")])
    line = error_line(err)
    assert code == 2 and "offline" in line and "HF_HUB_OFFLINE" in line and "nobody/no-such-pipeline" in line


@pytest.fixture
def planted_pipeline(tmp_path):
    """An unconditional pipeline folder whose model_index names a pipeline class from a .py file it ships."""
    folder = tmp_path / "planted"
    export_pipeline(build_unet("tiny", 16), build_noise_scheduler(10, "linear", "epsilon"), folder)
    marker = tmp_path / "code_ran"
    (folder / "my_pipeline.py").write_text(
        "from pathlib import Path\n"
        "from diffusers import DDPMPipeline\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "class MyPipeline(DDPMPipeline):\n"
        "    pass\n")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = ["my_pipeline", "MyPipeline"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder, marker


def test_a_pipeline_that_ships_code_is_refused_in_one_line_until_trusted(capsys, tmp_path, planted_pipeline):
    folder, marker = planted_pipeline
    common = ["sample", "--model", str(folder), "--num_images", "1", "--steps", "2", "--output",
              str(tmp_path / "g.png"), "--device", "cpu"]
    code, err = run_main(capsys, common)
    line = error_line(err)
    assert code == 2 and "my_pipeline.py" in line and "--trust_remote_code" in line
    assert not marker.exists()  # the planted code did not run
    assert main([*common, "--trust_remote_code"]) == 0
    assert marker.exists() and (tmp_path / "g.png").is_file()


def test_a_unet_that_ships_code_is_refused_in_one_line(capsys, tmp_path, planted_pipeline):
    folder, marker = planted_pipeline
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "DDPMPipeline"
    index["unet"] = ["my_unet", "MyUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "my_pipeline.py").rename(folder / "unet" / "my_unet.py")
    code, err = run_main(capsys, ["sample", "--model", str(folder), "--output", str(tmp_path / "g.png")])
    line = error_line(err)
    assert code == 2 and "my_unet.py" in line and "--trust_remote_code" in line
    assert not marker.exists()


# -- 2. checkpoint rotation and `latest` that lose work --------------------------------------------------------------
def damage(checkpoint: Path) -> None:
    model = checkpoint / "model.safetensors"
    raw = bytearray(model.read_bytes())
    raw[-1] ^= 0xFF
    model.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A 4-step run with checkpoints 2 and 4 (copied by the tests that damage them)."""
    root = tmp_path_factory.mktemp("rotation")
    data = make_class_folder(root / "images")
    assert main(["train", *tiny_train_args(data, root / "run", max_train_steps=4, checkpointing_steps=2)]) == 0
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return data, root / "run"


@pytest.mark.slow
def test_rotation_counts_only_intact_checkpoints_and_sets_damaged_ones_aside(four_steps, tmp_path, caplog):
    data, original = four_steps
    out = tmp_path / "run"
    shutil.copytree(original, out)
    damage(out / "checkpoints" / "checkpoint-4")
    with caplog.at_level("WARNING"):  # resumes from checkpoint-2; checkpoint-3 must survive the limit of 1
        assert main(["train", *tiny_train_args(data, out, resume_from_checkpoint="latest", max_train_steps=3,
                                               checkpointing_steps=1, checkpoints_total_limit=1)]) == 0
    assert [step for step, _ in checkpointing.complete_checkpoints(out)] == [3]
    checkpointing.verify_checkpoint(out / "checkpoints" / "checkpoint-3")
    assert (out / "checkpoints" / "damaged" / "checkpoint-4" / "model.safetensors").is_file()
    assert any("checkpoint-4" in r.getMessage() and "damaged" in r.getMessage() and "moved to" in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow
def test_latest_with_only_damaged_checkpoints_refuses_unless_a_fresh_start_is_asked(four_steps, tmp_path, capsys,
                                                                                    caplog):
    data, original = four_steps
    out = tmp_path / "run"
    shutil.copytree(original, out)
    for step in (2, 4):
        damage(out / "checkpoints" / f"checkpoint-{step}")
    args = tiny_train_args(data, out, resume_from_checkpoint="latest", checkpoints_total_limit=1)
    code, err = run_main(capsys, ["train", *args])
    line = error_line(err)
    assert code == 2 and "none of the checkpoints" in line and "checkpoint-4" in line and "checkpoint-2" in line
    assert "--overwrite_output_dir" in line
    assert [step for step, _ in checkpointing.complete_checkpoints(out)] == [2, 4]  # nothing touched
    with caplog.at_level("WARNING"):
        assert main(["train", *args, "--overwrite_output_dir"]) == 0
    assert "starting a new run from step 0" in caplog.text
    assert [step for step, _ in checkpointing.complete_checkpoints(out)] == [6]
    checkpointing.verify_checkpoint(out / "checkpoints" / "checkpoint-6")


@pytest.mark.slow
@pytest.mark.parametrize("resume", [None, "latest"])
def test_a_checkpoint_folder_this_run_did_not_write_is_never_overwritten(capsys, image_folder, tmp_path, resume):
    out = tmp_path / "out"
    foreign = out / "checkpoints" / "checkpoint-2"  # another tool's, or an older layout: no COMPLETE marker
    foreign.mkdir(parents=True)
    (foreign / "weights.bin").write_bytes(b"not ours")
    extra = {"resume_from_checkpoint": resume} if resume else {}
    code, err = run_main(capsys, ["train", *tiny_train_args(image_folder, out, **extra)])
    line = error_line(err)
    assert code == 2 and "checkpoint-2" in line and "COMPLETE" in line
    assert "--output_dir" in line and "--overwrite_output_dir" in line
    assert (foreign / "weights.bin").read_bytes() == b"not ours"


@pytest.mark.slow
def test_a_new_run_does_not_mix_its_checkpoints_with_another_runs(capsys, four_steps, tmp_path):
    data, original = four_steps
    out = tmp_path / "run"
    shutil.copytree(original, out)
    args = tiny_train_args(data, out, max_train_steps=2, checkpointing_steps=1, checkpoints_total_limit=1)
    code, err = run_main(capsys, ["train", *args])  # no --resume_from_checkpoint: a new run
    assert code == 2 and "holds another run's checkpoints" in error_line(err)
    assert [step for step, _ in checkpointing.complete_checkpoints(out)] == [2, 4]
    assert main(["train", *args, "--overwrite_output_dir"]) == 0
    assert [step for step, _ in checkpointing.complete_checkpoints(out)] == [2]  # the new run's, not the old 4


# -- 3. disk and permission faults ----------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """mount(size, read_only=False) -> a folder on its own tmpfs of that size (root only; skipped otherwise)."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_output_dir_that_cannot_be_written_is_one_line_before_any_work(capsys, image_folder, tmp_path, where):
    if where == "file":
        out = tmp_path / "taken"
        out.write_text("a file")
        expected = "is a file"
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc")
        out, expected = Path("/proc/flowers-ddpm-test/out"), "cannot be written"
    code, err = run_main(capsys, ["train", *tiny_train_args(image_folder, out)])
    line = error_line(err)
    assert code == 2 and expected in line and str(out) in line


@pytest.mark.slow
def test_an_output_dir_on_a_read_only_mount_is_one_line_before_any_work(capsys, image_folder, small_disk):
    out = small_disk("1m", read_only=True) / "out"
    code, err = run_main(capsys, ["train", *tiny_train_args(image_folder, out)])
    line = error_line(err)
    assert code == 2 and "read-only file system" in line.lower() and str(out) in line


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save_names_what_was_kept_and_leaves_no_partial_folder(
        capsys, image_folder, small_disk):
    # one checkpoint of the tiny model is about 11.4 MB: the second one does not fit
    out = small_disk("16m") / "out"
    code, err = run_main(capsys, ["train", *tiny_train_args(image_folder, out, max_train_steps=4)])
    line = error_line(err)
    assert code == EXIT_STORAGE
    assert "no space left on device" in line and "checkpoint-4.tmp" in line
    assert str(out / "checkpoints" / "checkpoint-2") + " is intact" in line
    assert "--resume_from_checkpoint latest" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    checkpointing.verify_checkpoint(out / "checkpoints" / "checkpoint-2")


@pytest.mark.slow
def test_a_full_disk_during_the_export_names_what_was_kept_and_leaves_no_partial_folder(
        capsys, image_folder, small_disk):
    # the checkpoint (about 11.4 MB) fits, the exported pipeline (about 2.8 MB more) does not
    out = small_disk("13m") / "out"
    code, err = run_main(capsys, ["train", *tiny_train_args(image_folder, out, max_train_steps=2)])
    line = error_line(err)
    assert code == EXIT_STORAGE
    assert "no space left on device" in line and "export" in line
    assert str(out / "checkpoints" / "checkpoint-2") + " is intact" in line
    assert not (out / "pipeline.tmp").exists() and not (out / "pipeline").exists()
    checkpointing.verify_checkpoint(out / "checkpoints" / "checkpoint-2")


@pytest.mark.slow
@pytest.mark.parametrize("size, steps, kept, what", [("16m", 4, 2, "checkpoint-4.tmp"), ("13m", 2, 2, "export")])
def test_a_full_disk_during_a_two_process_run_stops_both_processes_with_one_line_and_its_exit_code(
        image_folder, small_disk, size, steps, kept, what):
    from .test_fault_tolerance import launch_two

    # the second checkpoint does not fit / the checkpoint fits and the export (main process only) does not: the
    # other process must not die of the lost connection (a gloo traceback and exit code 1, which the launcher
    # reported as the root cause), and the main process must say why before the launcher stops anyone
    out = small_disk(size) / "out"
    run = launch_two(tiny_train_args(image_folder, out, max_train_steps=steps))
    _, err = run.communicate(timeout=300)
    line = error_line(err)  # printed once, by the main process
    assert "no space left on device" in line and what in line
    assert str(out / "checkpoints" / f"checkpoint-{kept}") + " is intact" in line
    assert "[rank" not in err and "Connection closed" not in err, err[-4000:]  # no process's own traceback
    failures = re.findall(r"exitcode\s*:\s*(-?\d+)", err)  # the launcher's report of the failed processes
    assert failures and "1" not in failures, err[-3000:]  # no process ended as an uncaught exception
    # Known and not fixed (docs/training.md): under load the main process sometimes aborts in gloo's teardown
    # after it has printed the line ("terminate called without an active exception", SIGABRT), and the launcher
    # then reports -6 as the root cause instead of 74; once in two full-suite runs, never when run alone.
    teardown_abort = "terminate called without an active exception" in err
    assert failures[-1] == str(EXIT_STORAGE) or teardown_abort, err[-3000:]  # the last one is the root cause
    assert run.returncode != 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"checkpoint-{kept}"]
    checkpointing.verify_checkpoint(out / "checkpoints" / f"checkpoint-{kept}")
