"""`flowers-ddpm sweep`: a 2x2 grid of tiny runs, SIGKILLed during its third trial and rerun, writes one table of 4
rows without rerunning the finished trials; grid mistakes are one-sentence errors before any training."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from flowers_ddpm.cli import main
from flowers_ddpm.training import checkpointing

from .conftest import REPO, make_class_folder

FEATURE_NET = "tests.feature_nets:tiny_conv_net"
GRID = ["learning_rate=1e-4,2e-4", "prediction_type=epsilon,v_prediction"]
TRIALS = ["01-learning_rate=1e-4-prediction_type=epsilon", "02-learning_rate=1e-4-prediction_type=v_prediction",
          "03-learning_rate=2e-4-prediction_type=epsilon", "04-learning_rate=2e-4-prediction_type=v_prediction"]
TINY = dict(model_preset="tiny", resolution=8, train_batch_size=4, checkpointing_steps=2, save_images_steps=100,
            eval_batch_size=2, ddpm_num_inference_steps=2, ddpm_num_steps=20, shuffle_buffer_size=8, logger="none",
            logging_steps=1, lr_warmup_steps=0)


def sweep_args(base, out, *grid):
    return ["--config", str(base), "--grid", *(grid or GRID), "--max_train_steps", "4", "--output_dir", str(out),
            "--num_images", "4", "--batch_size", "4", "--steps", "2", "--feature_network", FEATURE_NET,
            "--reference_cache_dir", str(out.parent / "cache")]


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data = make_class_folder(root / "data", per_class=3)
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump({**TINY, "train_data_dir": str(data)}))
    return path


def _logged_steps(trial) -> list[int]:
    return [json.loads(line)["step"] for line in (trial / "report" / "loss.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def interrupted_then_rerun(base_config):
    """Run the sweep in a real process, SIGKILL it once the third trial has saved a checkpoint, rerun it here."""
    out = base_config.parent / "out"
    trials = out / "trials"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(base_config.parent / "first-run.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "flowers_ddpm.cli", "sweep", *sweep_args(base_config, out)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if checkpointing.complete_checkpoints(trials / TRIALS[2]):
                break
            time.sleep(0.02)
        process.kill()
        process.wait()
    assert process.returncode == -9, (base_config.parent / "first-run.log").read_text()[-3000:]
    killed = {name: (trials / name / "result.json").is_file() for name in TRIALS}
    before = {name: ((trials / name / "result.json").stat().st_mtime_ns, _logged_steps(trials / name))
              for name in TRIALS[:2]}
    assert main(["sweep", *sweep_args(base_config, out)]) == 0
    return out, killed, before


@pytest.mark.slow
def test_rerun_finishes_only_the_unfinished_trials(interrupted_then_rerun):
    out, killed, before = interrupted_then_rerun
    assert killed == {TRIALS[0]: True, TRIALS[1]: True, TRIALS[2]: False, TRIALS[3]: False}
    for name, (mtime, steps) in before.items():  # trials 1-2: neither retrained nor re-evaluated
        assert (out / "trials" / name / "result.json").stat().st_mtime_ns == mtime
        assert _logged_steps(out / "trials" / name) == steps == [1, 2, 3, 4]
    third = _logged_steps(out / "trials" / TRIALS[2])
    # resumed from its step-2 checkpoint: step 1 was trained once (steps after the checkpoint may be logged twice)
    assert third.count(1) == 1 and third.count(2) == 1 and third[-1] == 4
    assert _logged_steps(out / "trials" / TRIALS[3]) == [1, 2, 3, 4]
    finished = [json.loads((out / "trials" / name / "result.json").read_text())["finished_at"] for name in TRIALS]
    assert finished == sorted(finished)


@pytest.mark.slow
def test_table_has_one_row_per_trial(interrupted_then_rerun):
    out, _, _ = interrupted_then_rerun
    table = (out / "results.md").read_text()
    assert "| trial | learning_rate | prediction_type | final loss | FID | KID |" in table
    rows = [line for line in table.splitlines() if line.startswith("| 0")]
    assert [row.split(" | ")[0][2:] for row in rows] == TRIALS
    assert "| 0.0002 | v_prediction |" in rows[3]
    with open(out / "results.csv") as f:
        records = list(csv.DictReader(f))
    assert [(r["learning_rate"], r["prediction_type"]) for r in records] == [
        ("0.0001", "epsilon"), ("0.0001", "v_prediction"), ("0.0002", "epsilon"), ("0.0002", "v_prediction")]
    for record in records:
        assert all(float(record[key]) > 0 for key in ("fid", "final_loss", "train_images_per_sec"))
        assert float(record["kid_mean"]) == float(record["kid_mean"])  # a number, not NaN
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    # each trial's metrics also travel with its pipeline
    assert json.loads((out / "trials" / TRIALS[0] / "pipeline" / "metrics.json").read_text())["results"][0]["fid"] > 0


@pytest.mark.slow
def test_rerun_of_a_finished_sweep_trains_nothing_and_other_arguments_are_refused(
        interrupted_then_rerun, base_config, capsys):
    out, _, _ = interrupted_then_rerun
    results = {name: (out / "trials" / name / "result.json").stat().st_mtime_ns for name in TRIALS}
    assert main(["sweep", *sweep_args(base_config, out)]) == 0
    assert {name: (out / "trials" / name / "result.json").stat().st_mtime_ns for name in TRIALS} == results
    capsys.readouterr()
    assert main(["sweep", *sweep_args(base_config, out, "learning_rate=1e-4,3e-4")]) == 2
    assert "holds a sweep with a different grid" in capsys.readouterr().err
    other = base_config.with_name("other.yaml")
    other.write_text(yaml.safe_dump({**yaml.safe_load(base_config.read_text()), "train_batch_size": 2}))
    assert main(["sweep", *sweep_args(other, out)]) == 2
    assert "holds a sweep with a different base_config" in capsys.readouterr().err


@pytest.mark.slow
def test_a_trial_killed_after_its_final_checkpoint_is_exported_and_evaluated_without_training(
        interrupted_then_rerun, base_config):
    import shutil

    out, _, _ = interrupted_then_rerun
    last = out / "trials" / TRIALS[3]
    steps = _logged_steps(last)
    others = {n: (out / "trials" / n / "result.json").stat().st_mtime_ns for n in TRIALS[:3]}
    (last / "result.json").unlink()
    shutil.rmtree(last / "pipeline")  # as if killed between the step-4 checkpoint and the export
    assert main(["sweep", *sweep_args(base_config, out)]) == 0
    assert (last / "result.json").is_file() and (last / "pipeline" / "model_index.json").is_file()
    assert _logged_steps(last) == steps  # no step was trained again
    assert {n: (out / "trials" / n / "result.json").stat().st_mtime_ns for n in TRIALS[:3]} == others


@pytest.mark.slow
def test_ctrl_c_during_a_trials_evaluation_exits_75_with_advice_and_the_rerun_finishes(base_config):
    out = base_config.parent / "interrupted-evaluation"
    args = sweep_args(base_config, out, "learning_rate=1e-4")
    args[args.index(FEATURE_NET)] = "tests.feature_nets:interrupting_net"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "FLOWERS_TEST_INTERRUPT": "1"}
    result = subprocess.run([sys.executable, "-m", "flowers_ddpm.cli", "sweep", *args], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 75, result.stderr[-3000:]
    assert "was interrupted after its training steps; rerun the same sweep command" in result.stderr
    assert "Traceback" not in result.stderr
    trial = out / "trials" / "01-learning_rate=1e-4"
    assert not (trial / "result.json").is_file() and (trial / "pipeline" / "model_index.json").is_file()
    steps = _logged_steps(trial)
    assert main(["sweep", *args]) == 0  # same command, no interruption this time (the variable is not set here)
    assert (trial / "result.json").is_file() and _logged_steps(trial) == steps


@pytest.mark.parametrize("grid, extra, message", [
    (["learning_rat=1e-4,2e-4"], [], "error: grid key 'learning_rat' is not a training setting"),
    (["prediction_type=epsilon,eps"], [], "error: trial prediction_type=eps: prediction_type must be one of"),
    (["output_dir=a,b"], [], "error: grid key 'output_dir' cannot be swept"),
    (["learning_rate"], [], "error: grid entry 'learning_rate' must look like setting=value1,value2"),
    (GRID, ["--class_labels", "red"],
     "error: --class_labels, --guidance_scale and --guidance_interval need class-conditional trials"),
    (GRID, ["--guidance_interval", "0", "4"],
     "error: --class_labels, --guidance_scale and --guidance_interval need class-conditional trials"),
    (["class_conditional=true"], ["--guidance_interval", "4", "1"],
     "error: --guidance_interval takes two noise levels 0 <= LO < HI; got 4 1"),
    (["sample_guidance_interval=5 1"], ["--class_conditional"], "error: trial sample_guidance_interval=5 1: "
     "sample_guidance_interval takes two noise levels 0 <= LO < HI; got 5 1"),
    (["class_conditional=true"], ["--class_labels", "purple"], "error: unknown class 'purple'; classes are blue, red"),
])
def test_grid_and_evaluation_mistakes_are_one_sentence_before_any_training(base_config, tmp_path, capsys, grid,
                                                                           extra, message):
    out = tmp_path / "sweep"
    assert main(["sweep", *sweep_args(base_config, out, *grid), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists()


def test_a_trial_trains_with_its_grid_interval_and_is_evaluated_with_the_sweeps(base_config, tmp_path):
    """`--grid sample_guidance_interval=...` becomes the trial's exported default; `--guidance_interval` replaces it
    in the evaluation, which records it (and the manifest keeps it)."""
    out = tmp_path / "interval-sweep"
    assert main(["sweep", *sweep_args(base_config, out, "sample_guidance_interval=0 1"), "--class_conditional",
                 "--guidance_interval", "0", "4", "--no-precision_recall"]) == 0
    [trial] = (out / "trials").iterdir()
    assert trial.name == "01-sample_guidance_interval=0_1"
    assert json.loads((trial / "pipeline" / "model_index.json").read_text())["guidance_interval"] == [0.0, 1.0]
    assert json.loads((trial / "metrics.json").read_text())["conditioning"]["guidance_interval"] == [0.0, 4.0]
    assert json.loads((out / "sweep.json").read_text())["evaluation"]["guidance_interval"] == [0.0, 4.0]


def test_training_flags_override_the_base_config_of_every_trial(base_config, tmp_path, capsys):
    """Training settings given as flags reach every trial (over the YAML, under the grid): an odd --resolution is
    (9 with the tiny UNet) is refused for the first trial before any training, naming the trial."""
    out = tmp_path / "flags-sweep"
    assert main(["sweep", *sweep_args(base_config, out), "--resolution", "9"]) == 2
    err = capsys.readouterr().err
    assert "trial learning_rate=1e-4, prediction_type=epsilon: resolution must be divisible by 2" in err
    assert not out.exists()


def test_ema_sigma_rel_needs_trials_with_post_hoc_ema(base_config, tmp_path, capsys):
    out = tmp_path / "ema-sweep"
    assert main(["sweep", *sweep_args(base_config, out), "--ema_sigma_rel", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ema_sigma_rel needs trials trained with post-hoc EMA snapshots") and not out.exists()
    assert main(["sweep", *sweep_args(base_config, out), "--phema_sigma_rel", "0.05,0.1", "--ema_sigma_rel", "0.3"]) == 2
    assert "--ema_sigma_rel values must lie in (0, 0.28)" in capsys.readouterr().err
