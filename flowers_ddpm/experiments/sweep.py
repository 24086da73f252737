"""`flowers-ddpm sweep`: one short training run per combination of a settings grid, each evaluated, one table.

Trials run one after another inside this process (`run_training`, then `run_evaluation`), not as
`flowers-ddpm train` subprocesses. A subprocess would pay the import of torch, diffusers and datasets (about 10 s)
for every trial, a large share of a short one; and under `accelerate launch` every process simply runs the same
trials in the same order on the process group it already has, so a multi-GPU sweep needs no launcher of its own
(`accelerate launch scripts/sweep.py ...`). The price: what accelerate fixes once per process (mixed_precision)
cannot vary within one sweep (so `auto` means accelerate's config here, as `config` does: a timed choice per trial
could differ between trials), and an error in a trial ends the sweep (a rerun continues where it stopped).

Layout of a sweep folder, and how it resumes: `sweep.json` holds the arguments (a rerun must match them); each
trial is an ordinary training output folder under `trials/`, trained with `--resume_from_checkpoint latest`, so an
interrupted trial continues from its newest checkpoint; a trial is finished when its `result.json` exists, and a
rerun skips finished trials. `sweep --search optuna` (optuna_search.py) uses the same trials, resume and table,
with Optuna choosing each trial's values.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import statistics
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch.distributed
from tqdm.auto import tqdm

from .._util.atomic import atomic_write_text
from .._util.distributed import process_state
from .._util.ranks import is_main_process
from ..config.loading import build_config, load_yaml
from ..config.sections import FIELDS, TrainConfig
from ..data.stream import open_source
from ..errors import UserError
from ..evaluation.command import rank_models, run_evaluation
from ..evaluation.features import load_factory, resolve_inception_weights
from ..models.unet import check_preset
from ..pipelines.conditioning import check_guidance_interval, class_ids
from ..publish.run_log import read_records
from ..training.diffusion_run import run_training
from ..training.phema import check_sigma_rels, export_reconstructions, reconstruction_folder
from ..training.stopping import InterruptOnSigterm, Preempted, TrainingStopped
from .sweep_report import write_comparison

logger = logging.getLogger(__name__)
MANIFEST, RESULT_FILE, TRIALS_DIR = "sweep.json", "result.json", "trials"
# settings the sweep itself decides, and why a grid cannot vary them
NOT_IN_GRID = {
    "output_dir": "each trial gets its own folder under the sweep's --output_dir",
    "resume_from_checkpoint": "trials always resume from their latest checkpoint",
    "max_train_steps": "it is the sweep's --max_train_steps",
    "num_epochs": "trials run --max_train_steps",
    "mixed_precision": "accelerate fixes it once per process; run one sweep per precision",
    "push_to_hub": "push the trial you pick with `flowers-ddpm push`",
}


@dataclass
class Trial:
    """One combination of grid values and the validated training config it gives."""

    name: str
    values: dict  # grid key -> value as typed on the command line
    cfg: TrainConfig

    @property
    def folder(self) -> Path:
        return Path(self.cfg.run.output_dir)

    @property
    def finished(self) -> bool:
        return (self.folder / RESULT_FILE).is_file()


def check_key(key: str, seen, what: str = "grid key") -> None:
    """A setting a sweep may vary: a training flag the sweep does not decide itself, given once."""
    if key not in FIELDS or not FIELDS[key].metadata["cli"]:
        raise UserError(f"{what} {key!r} is not a training setting; see `flowers-ddpm train --help`")
    if key in NOT_IN_GRID:
        raise UserError(f"{what} {key!r} cannot be swept: {NOT_IN_GRID[key]}")
    if key in seen:
        raise UserError(f"{what} {key!r} is given twice")


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`["learning_rate=1e-4,2e-4", ...]` -> {"learning_rate": ["1e-4", "2e-4"], ...}, keys in the given order."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        choices = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(choices):
            raise UserError(f"grid entry {item!r} must look like setting=value1,value2")
        check_key(key, grid)
        grid[key] = choices
    return grid


def folder_name(index: int, values: dict) -> str:
    """`01-learning_rate=1e-4-prediction_type=epsilon`: the trial's number and values, safe as a folder name."""
    text = "-".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in values.items())
    return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def check_base(base: dict) -> None:
    if base.get("push_to_hub"):
        raise UserError(f"push_to_hub cannot be used in a sweep: {NOT_IN_GRID['push_to_hub']}")


def make_trial(base: dict, values: dict, name: str, max_train_steps: int, sweep_dir: Path) -> Trial:
    """One trial's validated TrainConfig: the base settings, the trial's values, and what the sweep decides (a bad
    value is a UserError naming the trial's values)."""
    overrides = {**values, "max_train_steps": max_train_steps, "output_dir": str(sweep_dir / TRIALS_DIR / name),
                 "resume_from_checkpoint": "latest"}
    try:
        cfg = build_config(base, overrides)
        check_preset(cfg.model, cfg.data.resolution, pretrained=cfg.finetune.init_from is not None)
        check_guidance_interval(cfg.run.sample_guidance_interval, "sample_guidance_interval")
    except UserError as e:
        raise UserError(f"trial {', '.join(f'{k}={v}' for k, v in values.items())}: {e}") from None
    if cfg.speed.mixed_precision == "auto":  # one precision for every trial, so that they compare
        cfg.speed.mixed_precision = "config"
    if cfg.speed.channels_last is None:  # and one layout, eager unless asked
        cfg.speed.channels_last = True
    if cfg.speed.compile is None:
        cfg.speed.compile = False
    return Trial(name, values, cfg)


def plan_trials(base: dict, grid: dict[str, list[str]], max_train_steps: int, sweep_dir: Path) -> list[Trial]:
    """Every combination of the grid as a validated TrainConfig (a bad value is a UserError before any training)."""
    combinations = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return [make_trial(base, values, folder_name(index, values), max_train_steps, sweep_dir)
            for index, values in enumerate(combinations, start=1)]


def end_process_group() -> None:
    """What `accelerator.end_training()` does at the end of a training run, once for the whole sweep."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def claim_folder(sweep_dir: Path, manifest: dict) -> None:
    """Record the sweep's arguments in a new folder, or check that a rerun into it uses the same ones."""
    path = sweep_dir / MANIFEST
    if path.is_file():
        recorded = json.loads(path.read_text())
        differing = [part for part in manifest if recorded.get(part) != manifest[part]]
        if differing:
            raise UserError(f"{sweep_dir} holds a sweep with a different {' and '.join(differing)}; rerun with the "
                            "same arguments to continue it, or choose another --output_dir")
        return
    if (sweep_dir / TRIALS_DIR).exists():
        raise UserError(f"{sweep_dir} has trials but no {MANIFEST}; choose another --output_dir")
    if is_main_process():
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")


def trial_result(trial: Trial, report: dict) -> dict:
    """The trial's row of the comparison: its grid values, final loss, training throughput and metrics."""
    log = read_records(trial.folder)
    return {"trial": trial.name, "settings": {key: trial.cfg.get(key) for key in trial.values},
            "final_loss": log[-1]["loss"] if log else None,
            "train_images_per_sec": statistics.median(e["images_per_sec"] for e in log) if log else None,
            "metrics": report["results"][0], "finished_at": datetime.now(timezone.utc).isoformat()}


def run_trial(trial: Trial, evaluation, on_evaluation: Optional[Callable[[int, dict], None]] = None,
              ema_sigma_rels: Sequence[float] = ()) -> Optional[dict]:
    """Train (resuming from the trial's latest checkpoint), evaluate the exported pipeline, write result.json.
    `on_evaluation(step, row)` is called after each in-training evaluation (--eval_steps); it may stop the trial by
    raising (an Optuna search prunes this way). With `ema_sigma_rels` (a run trained with --phema_sigma_rel) the
    pipelines of those post-hoc EMA lengths are evaluated instead, and the best by FID is the trial's result."""
    # the next trial uses the same process group
    pipeline = run_training(trial.cfg, keep_process_group=True, on_evaluation=on_evaluation)
    options = dataclasses.replace(evaluation, model=str(pipeline), output=str(trial.folder / "metrics.json"),
                                  compare_schedulers=False)
    if ema_sigma_rels:
        return run_ema_trial(trial, options, ema_sigma_rels)
    report = run_evaluation(options, {})  # reference data: the trial's own training data (training_config.yaml)
    if report is None:  # not the main process
        return None
    return write_result(trial, trial_result(trial, report))


def run_ema_trial(trial: Trial, options, sigma_rels: Sequence[float]) -> Optional[dict]:
    """Reconstruct each EMA length (`ema-reconstruct`), rank them by FID (`evaluate --model ...`), keep the best."""
    if is_main_process():
        export_reconstructions(trial.folder, sigma_rels)
    process_state().wait_for_everyone()
    folders = [str(reconstruction_folder(trial.folder, s)) for s in sigma_rels]
    ranked = rank_models(dataclasses.replace(options, output=str(trial.folder / "ema-ranking.json")), folders, {})
    if ranked is None:  # not the main process
        return None
    best = folders.index(ranked["best"])
    return write_result(trial, {**trial_result(trial, ranked["reports"][best]), "ema_sigma_rel": sigma_rels[best]})


def write_result(trial: Trial, result: dict) -> dict:
    # atomically: a killed sweep never leaves a half-written result that counts as finished
    atomic_write_text(trial.folder / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result


@contextmanager
def sweep_stops(trial: Trial):
    """Run one trial with SIGTERM as a stop request; a stop ends the sweep with the advice to rerun it."""
    try:
        with InterruptOnSigterm():
            yield
    except Preempted as e:  # same exit code; the advice is the sweep's, not `train`'s
        raise Preempted(f"trial {trial.name} {str(e).split('; ')[0]}; rerun the same sweep command to "
                        "continue") from None
    except TrainingStopped as e:
        raise type(e)(f"trial {trial.name}: {e}") from None
    except KeyboardInterrupt:  # a signal outside the training steps (export, evaluation)
        raise Preempted(f"trial {trial.name} was interrupted after its training steps; rerun the same "
                        "sweep command to continue") from None


def check_evaluation(evaluation) -> None:
    """Fail before the first trial on evaluation settings that would otherwise fail after it."""
    least = 4 if evaluation.precision_recall else 2
    if evaluation.num_images < least:
        raise UserError(f"num_images must be >= {least} (4 for precision/recall with k=3); got {evaluation.num_images}")
    if evaluation.steps < 1 or evaluation.batch_size < 1:
        raise UserError("steps and batch_size must be >= 1")
    if evaluation.feature_network:
        load_factory(evaluation.feature_network)
    else:
        resolve_inception_weights(evaluation.inception_weights)


def check_conditioning(evaluation, trials: list[Trial]) -> None:
    """--class_labels/--guidance_scale/--guidance_interval need class-conditional trials, and labels the training
    data has (checked here, because a trial's evaluation would only find out after its training)."""
    if not evaluation.class_labels and evaluation.guidance_scale is None and evaluation.guidance_interval is None:
        return
    if not all(trial.cfg.model.class_conditional for trial in trials):
        raise UserError("--class_labels, --guidance_scale and --guidance_interval need class-conditional trials "
                        "(class_conditional: true)")
    if evaluation.class_labels:
        names = open_source(trials[0].cfg.data).class_names or []
        class_ids(evaluation.class_labels, names, len(names))


# evaluation arguments that do not change a result (images are seeded one by one, so the batch size does not matter)
NOT_IN_MANIFEST = ("model", "output", "compare_schedulers", "batch_size", "reference_cache_dir")


def evaluation_settings(evaluation) -> dict:
    """The evaluation arguments that make results comparable (part of the manifest); without a guidance interval
    they read as before it existed, so sweeps begun then can be continued."""
    return {k: v for k, v in dataclasses.asdict(evaluation).items()
            if k not in NOT_IN_MANIFEST and not (k == "guidance_interval" and v is None)}


def base_settings(config: str, overrides: Optional[dict], max_train_steps: int) -> dict:
    """The settings every trial shares: the YAML file, then the training flags given to the sweep."""
    if max_train_steps < 1:
        raise UserError(f"max_train_steps must be >= 1; got {max_train_steps}")
    base = {**load_yaml(config), **(overrides or {})}
    check_base(base)
    return base


def sweep_folder(base: dict, output_dir: Optional[str]) -> Path:
    return Path(output_dir or f"{base.get('output_dir', FIELDS['output_dir'].default)}-sweep")


def check_ema(sigma_rels: Optional[Sequence[float]], trials: list[Trial]) -> None:
    """--ema_sigma_rel needs trials that save post-hoc EMA snapshots (checked before the first one trains)."""
    if sigma_rels is None:
        return
    check_sigma_rels(sigma_rels, "--ema_sigma_rel")
    if not all(trial.cfg.ema.phema_sigma_rel for trial in trials):
        raise UserError("--ema_sigma_rel needs trials trained with post-hoc EMA snapshots: set phema_sigma_rel "
                        "(e.g. --phema_sigma_rel 0.05,0.1)")


def run_sweep(config: str, grid_items: list[str], max_train_steps: int, output_dir: Optional[str],
              evaluation, overrides: Optional[dict] = None, ema_sigma_rels: Optional[Sequence[float]] = None
              ) -> Optional[Path]:
    """The `sweep` command: run the unfinished trials, then write the comparison; returns the table path (main
    process) or None. `overrides`: training settings given as flags, over the YAML file and under the grid.
    `ema_sigma_rels`: each trial's result is its best of these post-hoc EMA lengths."""
    base = base_settings(config, overrides, max_train_steps)
    grid = parse_grid(grid_items)
    sweep_dir = sweep_folder(base, output_dir)
    trials = plan_trials(base, grid, max_train_steps, sweep_dir)
    check_evaluation(evaluation)
    check_conditioning(evaluation, trials)
    check_ema(ema_sigma_rels, trials)
    claim_folder(sweep_dir, {"base_config": base, "grid": grid, "max_train_steps": max_train_steps,
                             "evaluation": evaluation_settings(evaluation), "ema_sigma_rel": ema_sigma_rels})
    pending = [trial for trial in trials if not trial.finished]  # decided up front, identically on every process
    if len(pending) < len(trials):
        logger.info("%d of %d trials already finished; running the other %d", len(trials) - len(pending),
                    len(trials), len(pending))
    try:
        for trial in tqdm(pending, desc="sweep", unit="trial", disable=not is_main_process()):
            logger.info("trial %s", trial.name)
            with sweep_stops(trial):
                run_trial(trial, evaluation, ema_sigma_rels=ema_sigma_rels or ())
    finally:
        end_process_group()
    if not is_main_process():
        return None
    results = [json.loads((trial.folder / RESULT_FILE).read_text()) for trial in trials]
    return write_comparison(results, list(grid), sweep_dir, with_ema=ema_sigma_rels is not None)
