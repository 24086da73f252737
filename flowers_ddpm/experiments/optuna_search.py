"""`flowers-ddpm sweep --search optuna`: Optuna's TPE sampler chooses each trial's settings from ranges.

Everything but the choice of settings is the grid sweep's (sweep.py): a trial is the same training output folder
under `trials/`, trained with `--resume_from_checkpoint latest`, evaluated the same way, finished when its
`result.json` exists, and the study ends in the same results table. Optuna adds the proposals (TPE, seeded), the
study's record in `<sweep>/study.db` (SQLite, so a rerun of the same command continues it), and pruning on the
in-training FID: with `--eval_steps`, each in-training evaluation is reported to the trial, and Optuna's median
pruner stops a trial whose FID is worse than the median of earlier trials at the same step.

Under `accelerate launch` (several processes) the main process alone holds the study: it asks Optuna for each trial,
sends the trial's number, settings and folder to the other processes, and sends each pruning decision, so every
process trains the same trial on the process group it already has and stops it at the same step (the grid's
way of running on several GPUs, sweep.py).

Resuming: a trial still RUNNING in the database when the sweep starts was interrupted. If its `result.json` exists
it finished and only its outcome is recorded; otherwise it is marked FAIL and its settings are enqueued again with
its folder, so the new trial continues training from that folder's latest checkpoint (as a grid trial does).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from .._util.distributed import process_state
from .._util.ranks import is_main_process
from ..config.loading import setting_type
from ..errors import UserError
from .sweep import (
    RESULT_FILE,
    TRIALS_DIR,
    Trial,
    base_settings,
    check_conditioning,
    check_ema,
    check_evaluation,
    check_key,
    claim_folder,
    end_process_group,
    evaluation_settings,
    folder_name,
    make_trial,
    run_trial,
    sweep_folder,
    sweep_stops,
    trial_result,
    write_result,
)
from .sweep_report import write_comparison

try:
    import optuna
except ImportError:  # an extra: the grid sweep works without it
    optuna = None

logger = logging.getLogger(__name__)
STUDY_FILE, STUDY_NAME = "study.db", "sweep"
FOLDER_ATTR = "folder"  # the trial folder's name, kept with the Optuna trial (and given to its re-enqueued copy)
TPE_STARTUP_TRIALS = 4  # random trials before TPE models the results (Optuna's default, 10, suits long studies)
PRUNER_STARTUP_TRIALS = 2  # no pruning before this many trials have finished
SYNTAX = "setting=low:high, setting=log:low:high, setting=low:high:step or setting=value1,value2"


@dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range (log-uniform with `log`, on a grid with `step`) or a list."""

    name: str
    kind: str  # "float", "int" or "categorical"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: Optional[float] = None
    choices: tuple = ()

    def distribution(self):
        if self.kind == "categorical":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def extremes(self) -> list:
        """The values to validate before any training: every choice, or both ends of the range."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def spec(self) -> str:
        """The range as typed (canonical form), for sweep.json."""
        if self.kind == "categorical":
            return ",".join(self.choices)
        parts = ["log"] * self.log + [f"{self.low:g}", f"{self.high:g}"] + ([f"{self.step:g}"] if self.step else [])
        return ":".join(parts)


def _number(text: str, kind: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"param {item!r}: {text!r} is not a number; use {SYNTAX}") from None
    if kind == "int" and not value.is_integer():
        raise UserError(f"param {item!r}: the setting takes whole numbers, got {text}")
    return value


def parse_param(item: str, seen=()) -> Param:
    """`learning_rate=log:1e-4:3e-3` -> Param; a mistake is one UserError sentence."""
    key, sep, spec = (part.strip() for part in item.partition("="))
    if not sep or not key or not spec:
        raise UserError(f"param {item!r} must look like {SYNTAX}")
    check_key(key, seen, what="param")
    if ":" not in spec:
        choices = tuple(v.strip() for v in spec.split(","))
        if not all(choices):
            raise UserError(f"param {item!r} has an empty value; use {SYNTAX}")
        return Param(key, "categorical", choices=choices)
    tp = setting_type(key)
    if tp not in (int, float):
        raise UserError(f"param {item!r}: {key} is not a number; give its values as a list ({key}=a,b)")
    kind = tp.__name__
    parts = spec.split(":")
    log = parts[0].strip() == "log"
    parts = parts[1:] if log else parts
    if len(parts) not in (2, 3):
        raise UserError(f"param {item!r} must look like {SYNTAX}")
    low, high, *step = (_number(p.strip(), kind, item) for p in parts)
    step = step[0] if step else None
    if not low < high:
        raise UserError(f"param {item!r}: the low end must be below the high end")
    if log and low <= 0:
        raise UserError(f"param {item!r}: a log range needs a low end above 0")
    if step is not None and (step <= 0 or log):
        raise UserError(f"param {item!r}: the step must be above 0, and a log range takes no step")
    return Param(key, kind, low, high, log, step)


def parse_params(items: list[str]) -> dict[str, Param]:
    params: dict[str, Param] = {}
    for item in items:
        param = parse_param(item, params)
        params[param.name] = param
    return params


def require_optuna() -> None:
    if optuna is None:
        raise UserError("sweep --search optuna needs optuna: pip install 'flowers-ddpm[optuna]'")


def open_study(sweep_dir: Path, seed: int):
    """The sweep's study in <sweep_dir>/study.db: created on the first run, continued by later ones.

    Optuna keeps the trials in the database but not the sampler's random state, so a continued study seeded as
    the first run was would propose the first run's random start-up trials again; it is seeded with the seed plus
    the count of trials already stored instead (the same every time the same study is continued)."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}")
    try:
        stored = len(storage.get_all_trials(storage.get_study_id_from_name(STUDY_NAME), deepcopy=False))
    except KeyError:  # a new study
        stored = 0
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True, direction="minimize",
                               sampler=optuna.samplers.TPESampler(seed=seed + stored,
                                                                  n_startup_trials=TPE_STARTUP_TRIALS),
                               pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS))


def tell_result(study, number: int, result: dict) -> None:
    """Record a finished trial's outcome: its FID, or pruned."""
    if result.get("status", "complete") == "complete":
        study.tell(number, result["metrics"]["fid"])
    else:
        study.tell(number, state=optuna.trial.TrialState.PRUNED)


def recover_interrupted(study, sweep_dir: Path) -> None:
    """Trials left RUNNING by a killed sweep: record those that finished, re-enqueue the others with their folder."""
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        folder = frozen.user_attrs.get(FOLDER_ATTR)
        result = sweep_dir / TRIALS_DIR / folder / RESULT_FILE if folder else None
        if result is not None and result.is_file():
            tell_result(study, frozen.number, json.loads(result.read_text()))
            continue
        study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(dict(frozen.params), user_attrs={FOLDER_ATTR: folder} if folder else None)
        logger.info("trial %s was interrupted; it continues from its latest checkpoint", folder or frozen.number)


def from_main(value):
    """`value` as the main process has it, on every process of a launch (as is in a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


@dataclass
class FollowedTrial:
    """A trial as the processes other than the main one see it: the settings the main process's Optuna trial
    chose, and its pruning decisions (received from the main process, which alone reports to the study)."""

    number: int
    params: dict
    user_attrs: dict

    def set_user_attr(self, key: str, value) -> None:
        self.user_attrs[key] = value


def ended_trials(study) -> list:
    """The study's trials that count towards --n_trials: completed and pruned ones."""
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))


def shared_trial(study, distributions: dict, n_trials: int):
    """The next trial to run, the same on every process: the main process asks the study (None when it has
    `n_trials` finished trials) and the others get a FollowedTrial with its number, settings and folder."""
    trial = None
    if study is not None:
        if len(ended_trials(study)) < n_trials:
            trial = study.ask(distributions)
    message = from_main(None if trial is None else (trial.number, dict(trial.params), dict(trial.user_attrs)))
    if trial is None and message is not None:
        trial = FollowedTrial(*message)
    return trial


def report_to(trial):
    """The in-training evaluation hook: report the FID at this step, stop the training when Optuna prunes (the
    main process's decision, on every process)."""
    def report(step: int, row: dict) -> None:
        prune = None
        if not isinstance(trial, FollowedTrial):
            trial.report(row["fid"], step)
            prune = trial.should_prune()
        if from_main(prune):
            raise optuna.TrialPruned(f"pruned at step {step} (FID {row['fid']:.2f} in training)")
    return report


def run_one(study, trial, params: dict[str, Param], base: dict, max_train_steps: int, sweep_dir: Path,
            evaluation, ema_sigma_rels: Sequence[float] = ()) -> None:
    """Train and evaluate one trial and tell the study (`study` None: a process other than the main one)."""
    values = {name: trial.params[name] for name in params}
    name = trial.user_attrs.get(FOLDER_ATTR) or folder_name(trial.number + 1, values)
    trial.set_user_attr(FOLDER_ATTR, name)
    try:
        planned = make_trial(base, values, name, max_train_steps, sweep_dir)
    except UserError:  # a combination the config refuses: not retried by a rerun
        if study is not None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    logger.info("trial %s", planned.name)
    if planned.finished:
        result = json.loads((planned.folder / RESULT_FILE).read_text())
    else:
        try:
            with sweep_stops(planned):
                result = run_trial(planned, evaluation, report_to(trial), ema_sigma_rels)
        except optuna.TrialPruned as e:
            result = write_result(planned, {**pruned_result(planned), "status": str(e)}) if study is not None else None
    if study is not None:
        tell_result(study, trial.number, result)


def pruned_result(trial: Trial) -> dict:
    return trial_result(trial, {"results": [{}]})  # no final evaluation: no metrics


def run_search(config: str, param_items: list[str], n_trials: int, max_train_steps: int, output_dir: Optional[str],
               evaluation, overrides: Optional[dict] = None, sampler_seed: int = 0,
               ema_sigma_rels: Optional[Sequence[float]] = None) -> Optional[Path]:
    """`sweep --search optuna`: run trials until the study has `n_trials` finished ones (complete or pruned), then
    write the comparison; returns the table path. `ema_sigma_rels`: as for the grid (sweep.run_sweep)."""
    require_optuna()
    if n_trials < 1:
        raise UserError(f"n_trials must be >= 1; got {n_trials}")
    base = base_settings(config, overrides, max_train_steps)
    params = parse_params(param_items)
    sweep_dir = sweep_folder(base, output_dir)
    # both ends of every range (every choice) on its own, validated before any training
    probes = [make_trial(base, {p.name: value}, "check", max_train_steps, sweep_dir)
              for p in params.values() for value in p.extremes()]
    check_evaluation(evaluation)
    check_conditioning(evaluation, probes)
    check_ema(ema_sigma_rels, probes)
    claim_folder(sweep_dir, {"base_config": base, "search": "optuna",
                             "params": {name: p.spec() for name, p in params.items()},
                             "sampler_seed": sampler_seed, "max_train_steps": max_train_steps,
                             "evaluation": evaluation_settings(evaluation), "ema_sigma_rel": ema_sigma_rels})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        process_state()  # the process group the trials' messages travel on (and every trial's Accelerator uses)
    study = None
    if is_main_process():  # the main process alone holds the study (SQLite) and asks Optuna
        study = open_study(sweep_dir, sampler_seed)
        recover_interrupted(study, sweep_dir)
    distributions = {name: p.distribution() for name, p in params.items()}
    done = len(ended_trials(study)) if study is not None else 0
    if done:
        logger.info("%d of %d trials already finished", min(done, n_trials), n_trials)
    try:
        with tqdm(total=n_trials, initial=min(done, n_trials), desc="sweep", unit="trial",
                  disable=study is None) as bar:
            while (trial := shared_trial(study, distributions, n_trials)) is not None:
                run_one(study, trial, params, base, max_train_steps, sweep_dir, evaluation, ema_sigma_rels or ())
                bar.update(1)
    finally:
        end_process_group()
    if study is None:
        return None
    finished = sorted(ended_trials(study), key=lambda t: t.number)
    # trials added to the study through Optuna's own API (a warm start) have no folder and no row
    results = [json.loads((sweep_dir / TRIALS_DIR / t.user_attrs[FOLDER_ATTR] / RESULT_FILE).read_text())
               for t in finished if FOLDER_ATTR in t.user_attrs]
    title = (f"Optuna study (TPE, seed {sampler_seed}) over "
             + ", ".join(f"{name} {p.spec()}" for name, p in params.items()))
    return write_comparison(results, list(params), sweep_dir, title, with_status=True,
                            with_ema=ema_sigma_rels is not None)
