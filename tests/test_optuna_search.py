"""`flowers-ddpm sweep --search optuna`: range syntax and its errors, pruning on reported FIDs, and a tiny study
SIGKILLed during its second trial and rerun: the study in study.db continues (the finished trial is not run again,
the killed one resumes from its checkpoint) and ends in the grid's table with a status column. The study also
covers `--ema_sigma_rel` (shared with the grid): each trial's FID is that of its best post-hoc EMA length."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from flowers_ddpm.cli import main
from flowers_ddpm.errors import UserError
from flowers_ddpm.experiments import optuna_search
from flowers_ddpm.experiments.optuna_search import Param, parse_param, report_to
from flowers_ddpm.training import checkpointing

from .conftest import REPO, free_port, make_class_folder, run_command
from .test_sweep import FEATURE_NET, TINY, _logged_steps

PARAMS = ["learning_rate=log:1e-4:1e-3", "prediction_type=epsilon,v_prediction"]


def study_args(base, out, *params, n_trials=3):
    return ["sweep", "--config", str(base), "--search", "optuna", "--param", *(params or PARAMS), "--n_trials",
            str(n_trials), "--max_train_steps", "4", "--output_dir", str(out), "--num_images", "4", "--batch_size",
            "4", "--steps", "2", "--feature_network", FEATURE_NET, "--reference_cache_dir", str(out.parent / "cache"),
            # each trial's result: the better of two post-hoc EMA lengths
            "--phema_sigma_rel", "0.05,0.1", "--phema_snapshot_steps", "2", "--ema_sigma_rel", "0.06", "0.12"]


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("optuna")
    data = make_class_folder(root / "data", per_class=3)
    path = root / "base.yaml"
    # in-training FID every 2 steps (what the pruner sees), with the same small feature network
    path.write_text(yaml.safe_dump({**TINY, "train_data_dir": str(data), "eval_steps": 2, "eval_num_images": 4,
                                    "eval_feature_network": FEATURE_NET,
                                    "reference_cache_dir": str(root / "cache")}))
    return path


def test_ranges_parse_to_the_setting_type():
    assert parse_param("learning_rate=log:1e-4:3e-3") == Param("learning_rate", "float", 1e-4, 3e-3, log=True)
    assert parse_param("dropout=0:0.3") == Param("dropout", "float", 0.0, 0.3)
    assert parse_param("train_batch_size=8:32:8") == Param("train_batch_size", "int", 8, 32, step=8)
    assert parse_param("prediction_type=epsilon, v_prediction").choices == ("epsilon", "v_prediction")
    assert parse_param("learning_rate=log:1e-4:3e-3").spec() == "log:0.0001:0.003"
    dist = parse_param("train_batch_size=8:32:8").distribution()
    assert isinstance(dist, optuna.distributions.IntDistribution) and (dist.low, dist.high, dist.step) == (8, 32, 8)


@pytest.mark.parametrize("param, message", [
    ("learning_rate=3e-3:1e-4", "the low end must be below the high end"),
    ("learning_rate=log:0:1e-3", "a log range needs a low end above 0"),
    ("learning_rate=1e-4:x", "'x' is not a number"),
    ("learning_rate=1:2:3:4", "must look like setting=low:high"),
    ("train_batch_size=8:32.5", "the setting takes whole numbers"),
    ("prediction_type=0:1", "prediction_type is not a number; give its values as a list"),
    ("learning_rat=1e-4:1e-3", "param 'learning_rat' is not a training setting"),
    ("output_dir=a,b", "param 'output_dir' cannot be swept"),
])
def test_range_mistakes_are_one_sentence(param, message):
    with pytest.raises(UserError, match=message):
        parse_param(param)


@pytest.mark.parametrize("args, message", [
    (["learning_rate=log:0:1e-3"], "error: param 'learning_rate=log:0:1e-3': a log range needs a low end above 0"),
    (["prediction_type=epsilon,eps"], "error: trial prediction_type=eps: prediction_type must be one of"),
    (["learning_rate=1e-4:1e-3", "learning_rate=1e-4:2e-3"], "error: param 'learning_rate' is given twice"),
])
def test_search_mistakes_exit_2_before_any_training(base_config, tmp_path, capsys, args, message):
    out = tmp_path / "study"
    assert main(study_args(base_config, out, *args)) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists()


def test_without_optuna_the_error_names_the_extra(base_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(optuna_search, "optuna", None)  # as when the package is not installed
    assert main(study_args(base_config, tmp_path / "study")) == 2
    assert "sweep --search optuna needs optuna: pip install 'flowers-ddpm[optuna]'" in capsys.readouterr().err


def test_a_trial_worse_than_the_median_at_a_step_is_pruned():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for fid in (10.0, 20.0):
        trial = study.ask()
        report_to(trial)(2, {"fid": fid})
        study.tell(trial, fid)
    good, bad = study.ask(), study.ask()
    report_to(good)(2, {"fid": 12.0})  # better than the median (15): continues
    with pytest.raises(optuna.TrialPruned, match=r"pruned at step 2 \(FID 30.00 in training\)"):
        report_to(bad)(2, {"fid": 30.0})


@pytest.fixture(scope="module")
def killed_then_rerun(base_config):
    """The study in a real process, SIGKILLed once its second trial has saved a checkpoint, then rerun here."""
    out = base_config.parent / "out"
    trials = out / "trials"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(base_config.parent / "first-run.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "flowers_ddpm.cli", *study_args(base_config, out)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            second = list(trials.glob("02-*")) if trials.is_dir() else []
            if second and checkpointing.complete_checkpoints(second[0]):
                break
            time.sleep(0.02)
        process.kill()
        process.wait()
    assert process.returncode == -9, (base_config.parent / "first-run.log").read_text()[-3000:]
    first = next(trials.glob("01-*"))
    second = next(trials.glob("02-*"))
    assert (first / "result.json").is_file() and not (second / "result.json").is_file()
    before = (first / "result.json").stat().st_mtime_ns
    assert main(study_args(base_config, out)) == 0
    return out, first, second, before


@pytest.mark.slow
def test_a_killed_study_continues_where_it_stopped(killed_then_rerun):
    out, first, second, before = killed_then_rerun
    assert (first / "result.json").stat().st_mtime_ns == before  # neither retrained nor re-evaluated
    assert _logged_steps(first) == [1, 2, 3, 4]
    steps = _logged_steps(second)  # resumed from its step-2 checkpoint: steps 1 and 2 were trained once
    assert steps.count(1) == 1 and steps.count(2) == 1 and steps[-1] == 4
    assert (second / "result.json").is_file()
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    states = [(t.state.name, t.user_attrs.get("folder")) for t in study.trials]
    # the killed trial is recorded as failed; its settings ran again in its own folder
    assert states[:2] == [("COMPLETE", first.name), ("FAIL", second.name)]
    assert ("COMPLETE", second.name) in states[2:]
    assert study.trials[1].params == next(t.params for t in study.trials[2:] if t.user_attrs["folder"] == second.name)
    assert sum(state in ("COMPLETE", "PRUNED") for state, _ in states) == 3
    for trial in study.trials:  # every in-training FID reached Optuna (steps 2 and 4 of a whole run)
        if trial.state.name == "COMPLETE" and trial.user_attrs["folder"] != second.name:
            assert sorted(trial.intermediate_values) == [2, 4]


@pytest.mark.slow
def test_the_study_writes_the_grid_table_with_a_status_column(killed_then_rerun, base_config, capsys):
    out, first, second, _ = killed_then_rerun
    table = (out / "results.md").read_text()
    assert table.startswith("Optuna study (TPE, seed 0) over learning_rate log:0.0001:0.001, prediction_type "
                            "epsilon,v_prediction (3 trials)")
    assert "| trial | learning_rate | prediction_type | status | ema_sigma_rel | final loss | FID |" in table
    with open(out / "results.csv") as f:
        records = list(csv.DictReader(f))
    assert [r["trial"] for r in records][:2] == [first.name, second.name] and len(records) == 3
    for record in records:
        assert 1e-4 <= float(record["learning_rate"]) <= 1e-3
        assert record["prediction_type"] in ("epsilon", "v_prediction")
        assert record["status"] == "complete" and float(record["fid"]) > 0 or record["status"].startswith("pruned")
        if record["status"] == "complete":  # the trial's FID is its best EMA length's
            trial = out / "trials" / record["trial"]
            fids = {s: json.loads((trial / "ema-reconstruct" / f"sigma_rel-{s}" / "metrics.json").read_text())
                    ["results"][0]["fid"] for s in ("0.06", "0.12")}
            assert f"{float(record['ema_sigma_rel']):g}" == min(fids, key=fids.get)
            assert float(record["fid"]) == pytest.approx(min(fids.values()))
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    # a finished study reruns nothing; a grid into its folder is refused
    results = {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/result.json")}
    assert main(study_args(base_config, out)) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/result.json")} == results
    capsys.readouterr()
    grid = ["sweep", "--config", str(base_config), "--grid", "learning_rate=1e-4", "--max_train_steps", "4",
            "--output_dir", str(out), "--feature_network", FEATURE_NET]
    assert main(grid) == 2
    assert "holds a sweep with a different" in capsys.readouterr().err
    assert json.loads((out / "sweep.json").read_text())["params"] == {
        "learning_rate": "log:0.0001:0.001", "prediction_type": "epsilon,v_prediction"}


@pytest.mark.slow
def test_a_trial_worse_than_earlier_ones_at_an_evaluation_stops_there(base_config, tmp_path):
    """Two earlier trials in the study (added through Optuna's API) had FID 0.001 at steps 2 and 4: the first trial
    of the sweep is pruned at its step-2 evaluation, with no further training and no final evaluation."""
    out = tmp_path / "pruning"
    out.mkdir()
    study = optuna.create_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    distributions = {name: parse_param(p).distribution() for name, p in zip(("learning_rate", "prediction_type"),
                                                                               PARAMS)}
    for rate in (2e-4, 4e-4):
        study.add_trial(optuna.trial.create_trial(
            params={"learning_rate": rate, "prediction_type": "epsilon"}, distributions=distributions, value=0.001,
            intermediate_values={2: 0.001, 4: 0.001}))
    args = study_args(base_config, out, n_trials=3)
    args = args[:args.index("--phema_sigma_rel")]  # no post-hoc EMA here
    assert main(args) == 0
    trial = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}").trials[2]
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [2]
    folder = out / "trials" / trial.user_attrs["folder"]
    result = json.loads((folder / "result.json").read_text())
    assert result["status"] == f"pruned at step 2 (FID {trial.intermediate_values[2]:.2f} in training)"
    assert result["metrics"] == {} and _logged_steps(folder) == [1, 2]
    assert not (folder / "pipeline").exists() and not (folder / "metrics.json").exists()
    table = (out / "results.md").read_text()
    assert "(1 trials)" in table and f"| {result['status']} |" in table and "| - |" in table


def launch_two(args: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch scripts/sweep.py ARGS` as two real CPU processes."""
    return run_command(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                        str(REPO / "scripts" / "sweep.py"), *args[1:]],
                       env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, timeout=600)


@pytest.mark.slow
def test_two_processes_run_the_main_process_trials_and_prune_together(base_config, tmp_path):
    """Under `accelerate launch` with two processes the main process alone asks the study: the first launch's trial
    is trained and evaluated on both processes and recorded once; after two better trials are added to the study,
    the next launch's trial is pruned at its step-2 evaluation on both processes (a process that trained on alone
    would wait for the other at its next step's gradient all-reduce, and the launch would time out)."""
    out = tmp_path / "two"
    args = study_args(base_config, out, n_trials=1)
    args = args[:args.index("--phema_sigma_rel")]
    first = launch_two(args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "on 2 process(es)" in first.stderr
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="sweep", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]  # one trial: the other process asked none
    folder = out / "trials" / study.trials[0].user_attrs["folder"]
    assert sorted(p.name for p in (out / "trials").iterdir()) == [folder.name]
    assert _logged_steps(folder) == [1, 2, 3, 4]
    assert study.trials[0].value == json.loads((folder / "result.json").read_text())["metrics"]["fid"]

    distributions = study.trials[0].distributions
    for rate in (2e-4, 4e-4):
        study.add_trial(optuna.trial.create_trial(
            params={"learning_rate": rate, "prediction_type": "epsilon"}, distributions=distributions, value=0.001,
            intermediate_values={2: 0.001, 4: 0.001}))
    second = launch_two(study_args(base_config, out, n_trials=4)[:len(args)])
    assert second.returncode == 0, second.stderr[-3000:]
    trials = optuna.load_study(study_name="sweep", storage=storage).trials
    assert len(trials) == 4 and trials[3].state.name == "PRUNED" and list(trials[3].intermediate_values) == [2]
    pruned = out / "trials" / trials[3].user_attrs["folder"]
    assert _logged_steps(pruned) == [1, 2]
    assert json.loads((pruned / "result.json").read_text())["status"].startswith("pruned at step 2")
    assert len(list((out / "trials").iterdir())) == 2


def test_grid_and_param_flags_belong_to_their_search(base_config, tmp_path, capsys):
    args = study_args(base_config, tmp_path / "study")
    grid = [a for a in args if a not in ("--search", "optuna")]  # the grid search given optuna's --param
    assert main(grid) == 2
    assert capsys.readouterr().err.startswith("error: the grid search takes --grid SETTING=V1,V2")
    assert main([*args, "--grid", "learning_rate=1e-4"]) == 2
    assert capsys.readouterr().err.startswith("error: --search optuna takes --param SETTING=LOW:HIGH")
    assert main([*args[:args.index("--n_trials") + 1], "0", *args[args.index("--n_trials") + 2:]]) == 2
    assert "n_trials must be >= 1; got 0" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def test_a_continued_study_does_not_propose_its_first_trials_again(tmp_path):
    """Optuna stores trials, not the sampler's random state: reopened with the first run's seed, TPE's random
    start-up would propose trial 1's settings again. Continuing stays reproducible (two identical studies)."""
    distributions = {"learning_rate": parse_param("learning_rate=log:1e-4:1e-2", {}).distribution()}
    proposals = []
    for folder in (tmp_path / "a", tmp_path / "b"):
        folder.mkdir()
        study = optuna_search.open_study(folder, 0)
        first = [study.ask(distributions) for _ in range(2)]
        for trial in first:
            study.tell(trial, 1.0)
        continued = optuna_search.open_study(folder, 0).ask(distributions)
        assert continued.params["learning_rate"] not in [t.params["learning_rate"] for t in first]
        proposals.append([t.params for t in first] + [continued.params])
    assert proposals[0] == proposals[1]
