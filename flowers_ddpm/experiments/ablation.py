"""Recipe ablation: train recipe variants for the same wall-clock budget on real data and score their samples.

Each variant is a real `flowers-ddpm train` run (a subprocess, so every variant starts from a clean process and
the runs cannot leak state into each other) on a test bed written as class folders (flowers_ddpm.experiments.beds:
scikit-learn's digits, or real colour photographs such as the CIFAR-10 subset). The budget becomes a step count
from a short probe run of the same variant, so the LR schedule and EMA warm-up end where they would in a planned
run of that length. Each variant is trained class-conditionally, unconditionally, or both (`conditioning`);
samples are the same count, sampler family and seeds for every variant, and are scored with the bed's
classifier: Frechet distance in its feature space (against the training images, beside a real-vs-real baseline of
held-out images) and, for class-conditional samples, its accuracy on the requested classes. With `sample_sets` > 1
every score is the mean over that many independent sample sets.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from statistics import fmean
from typing import Optional, Sequence

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .._util.atomic import atomic_write_text
from .._util.tables import markdown_table
from ..config.recipes import RECIPES, recipe_settings
from ..errors import UserError
from ..evaluation.evaluate import images_to_tensor
from ..evaluation.metrics import frechet_distance
from ..models.unet import build_unet
from ..pipelines.conditioning import check_guidance_interval, guidance_in_effect, interval_label
from ..pipelines.sampling import generate, image_grid, load_pipeline
from ..publish.run_log import read_records
from ..training.phema import check_sigma_rels, export_reconstructions, reconstruction_folder
from . import beds

logger = logging.getLogger(__name__)

# diffusers' examples/unconditional_image_generation/train_unconditional.py defaults (the baseline row).
DIFFUSERS_DEFAULTS = {
    "learning_rate": 1e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 500, "train_batch_size": 16,
    "use_ema": True, "ema_inv_gamma": 1.0, "ema_power": 0.75, "ema_max_decay": 0.9999,
    "prediction_type": "epsilon", "ddpm_beta_schedule": "linear", "snr_gamma": None, "dropout": 0.0,
}

# The screening base: one factor is changed at a time from here (the diffusers defaults are the other reference).
CANDIDATE = {**DIFFUSERS_DEFAULTS, **recipe_settings("small-data", "small"), "dropout": 0.0}

# Adam betas (0.9, 0.99) with Improved DDPM's cosine noise schedule: the issue 16 screen's best pair on cifar10-5k.
_ADAM_COSINE = {"adam_beta1": 0.9, "adam_beta2": 0.99, "ddpm_beta_schedule": "squaredcos_cap_v2"}
# ADM's adaptive group norm: the time embedding scales and shifts each ResNet block's normalised activations
_SCALE_SHIFT = {"unet_config": {"resnet_time_scale_shift": "scale_shift"}}

# name -> overrides of CANDIDATE. Model variants keep the compute budget, so a bigger model gets fewer steps.
VARIANTS: dict[str, dict] = {
    "candidate": {},
    "lr-3e-4": {"learning_rate": 3e-4},
    "lr-2e-3": {"learning_rate": 2e-3},
    "warmup-500": {"lr_warmup_steps": 500},
    "lr-constant": {"lr_scheduler": "constant_with_warmup"},
    "ema-off": {"use_ema": False},
    "ema-diffusers": {"ema_power": 0.75, "ema_max_decay": 0.9999},
    "epsilon": {"prediction_type": "epsilon"},
    "min-snr-5": {"snr_gamma": 5.0},
    "cosine-schedule": {"ddpm_beta_schedule": "squaredcos_cap_v2"},
    "batch-16": {"train_batch_size": 16},
    "batch-32": {"train_batch_size": 32},
    "dropout-0.1": {"dropout": 0.1},
    "wide": {"unet_config": {"block_out_channels": [48, 96, 96]}},
    "deep": {"unet_config": {"layers_per_block": 2}},
    "two-level-unet": {"model_preset": "tiny"},
    "scale-shift": dict(_SCALE_SHIFT),
    "no-attention": {"unet_config": {"down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3}},
    "adam-0.9-0.99": {"adam_beta1": 0.9, "adam_beta2": 0.99},
    # EDM's log-normal training noise levels for the DDPM objective (--timestep_sampling lognormal)
    "lognormal-t": {"timestep_sampling": "lognormal"},
    # combinations of the issue 16 screen's winners on cifar10-5k (docs/recipes.md)
    # the screening base with another training seed (same judge and sampling seeds): how far one seed moves a row
    "train-seed-1": {"seed": 1},
    "adam+lognormal-t": {"adam_beta1": 0.9, "adam_beta2": 0.99, "timestep_sampling": "lognormal"},
    "adam+cosine": dict(_ADAM_COSINE),
    "adam+cosine+lr-constant": {**_ADAM_COSINE, "lr_scheduler": "constant_with_warmup"},
    "adam+lognormal-t+lr-constant": {"adam_beta1": 0.9, "adam_beta2": 0.99, "timestep_sampling": "lognormal",
                                     "lr_scheduler": "constant_with_warmup"},
    # one change at a time from adam+cosine, the best natural-image row (issue 16, seventh session)
    "adam+cosine+lr-2e-3": {**_ADAM_COSINE, "learning_rate": 2e-3},
    "adam+cosine+min-snr-5": {**_ADAM_COSINE, "snr_gamma": 5.0},
    "adam+cosine+no-clip": {**_ADAM_COSINE, "max_grad_norm": 0.0},
    "adam+cosine+scale-shift": {**_ADAM_COSINE, **_SCALE_SHIFT},  # = --recipe small-data-photos until session 14
    "adam+cosine+ema-diffusers": {**_ADAM_COSINE, "ema_power": 0.75, "ema_max_decay": 0.9999},
    "adam+cosine+scale-shift+lr-2e-3": {**_ADAM_COSINE, **_SCALE_SHIFT, "learning_rate": 2e-3},
    "adam+cosine+scale-shift+no-clip": {**_ADAM_COSINE, **_SCALE_SHIFT, "max_grad_norm": 0.0},
    "adam+cosine+scale-shift+min-snr-5": {**_ADAM_COSINE, **_SCALE_SHIFT, "snr_gamma": 5.0},
    # EDM-style training (Karras et al. 2022): preconditioning, log-normal noise levels, EDM loss weight
    "edm": {"objective": "edm", "prediction_type": "epsilon"},
    # non-leaking augmentation (EDM's augment pipe, conditioned on its labels; docs/recipes.md)
    "augment-0.12": {"augment_p": 0.12},
    "augment-0.3": {"augment_p": 0.3},
    # ... on the photographs recipe, at the finals' budget (about ten passes over cifar10-5k; issue 16, twelfth session)
    "adam+cosine+scale-shift+augment-0.12": {**_ADAM_COSINE, **_SCALE_SHIFT, "augment_p": 0.12},
    "adam+cosine+scale-shift+augment-0.3": {**_ADAM_COSINE, **_SCALE_SHIFT, "augment_p": 0.3},
    # ... a smaller batch, more optimizer steps (measured worse: docs/recipes.md, thirteenth session)
    "adam+cosine+scale-shift+batch-4": {**_ADAM_COSINE, **_SCALE_SHIFT, "train_batch_size": 4},
    # ... learned loss weights per noise level (EDM2's uncertainty weighting; issue 16, fourteenth session):
    # = --recipe small-data-photos, unconditional
    "adam+cosine+scale-shift+learned-weights": {**_ADAM_COSINE, **_SCALE_SHIFT, "learned_loss_weights": True},
    # ... and EDM's log-normal noise levels on top: the weights balance the levels' losses, the draw decides how much
    # of the training each level gets (issue 16, fifteenth session)
    "adam+cosine+scale-shift+learned-weights+lognormal-t": {**_ADAM_COSINE, **_SCALE_SHIFT,
                                                             "learned_loss_weights": True,
                                                             "timestep_sampling": "lognormal"},
}

# The EDM counterpart of each DDPM-family sampler (an EDM model refuses DDPM-family samplers and vice versa), so
# every row of a table uses the same kind of solver: DPM-Solver++ (2nd order, multistep) or a first-order one.
EDM_SAMPLERS = {"dpmsolver++": "edm-dpmsolver++", "sde-dpmsolver++": "edm-sde-dpmsolver++", "ddim": "edm-euler",
                "ddpm": "edm-euler"}

# Sample set k draws its images from seeds seed + k * SET_STRIDE + i, so set 0 is the single set of a run without
# sample sets, and sets of fewer than SET_STRIDE images never share a seed.
SET_STRIDE = 1000
# the keys of a score over several sample sets that hold each set's Frechet ratio and class accuracy
SET_KEYS = ("frechet_ratio_sets", "class_accuracy_sets")


def variant_settings(name: str, conditional: bool = True) -> dict:
    """Full recipe of a variant: the diffusers defaults, a named recipe as it is now (`small-data`,
    `small-data-photos`, for a class-conditional or unconditional run), or CANDIDATE + overrides."""
    if name == "diffusers-defaults":
        return dict(DIFFUSERS_DEFAULTS)
    if name in RECIPES:
        return {**DIFFUSERS_DEFAULTS, **recipe_settings(name, "small", conditional)}
    if name not in VARIANTS:
        known = ", ".join(["diffusers-defaults", *RECIPES, *VARIANTS])
        raise UserError(f"unknown variant {name!r}; known variants: {known}")
    return {**CANDIDATE, **VARIANTS[name]}


def describe(name: str) -> str:
    """What a variant changes, for the table."""
    if name == "diffusers-defaults" or name in RECIPES:
        return "the recipe itself"
    overrides = VARIANTS[name]
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(screening base)"


@dataclass
class AblationSettings:
    """Everything that is the same for every variant."""

    output_dir: Path
    budget_minutes: float = 10.0
    budget_images: Optional[int] = None  # instead of minutes: training images at the candidate model's FLOPs
    variants: tuple = ("diffusers-defaults", "small-data")
    num_samples: int = 200
    sampler: str = "dpmsolver++"
    sampler_steps: int = 20
    guidance_scale: float = 1.5
    guidance_interval: Optional[tuple] = None  # (lo, hi) noise levels of classifier-free guidance; None: every step
    model_preset: str = "small"
    resolution: int = 32
    probe_steps: int = 12
    classifier_epochs: int = 15
    seed: int = 0  # bed split, judge and sampling seeds (and the training seed unless train_seed is set)
    train_seed: Optional[int] = None  # another training seed for every variant, under the same judge and samples
    cache_dir: Optional[Path] = None
    bed: str = "digits"
    bed_path: Optional[Path] = None  # the bed's .npz file (cifar10-5k)
    conditioning: tuple = ("class",)  # "class" (class-conditional rows) and/or "none" (unconditional rows)
    # post-hoc EMA lengths scored for every variant beside its own EMA (each variant then trains with snapshots)
    ema_sigma_rels: tuple = ()
    sample_sets: int = 1  # independent sets of num_samples samples per score, averaged (seeds: SET_STRIDE)
    # None: train from the decode cache (every row of docs/recipes.md); N: through the streaming data path, the
    # default of `flowers-ddpm train`, with a shuffle buffer of N examples
    streaming_buffer: Optional[int] = None

    def validate(self) -> None:
        """One-sentence errors before any work."""
        for name in self.variants:
            variant_settings(name)
        if self.bed not in beds.BEDS:
            raise UserError(f"unknown bed {self.bed!r}; beds: {', '.join(beds.BEDS)}")
        if beds.BEDS[self.bed].needs_path and (self.bed_path is None or not Path(self.bed_path).is_file()):
            raise UserError(f"the {self.bed} bed needs --bed_path, its .npz file; got {self.bed_path}")
        if not self.conditioning or set(self.conditioning) - {"class", "none"}:
            raise UserError(f"conditioning must be 'class' and/or 'none'; got {' '.join(self.conditioning)}")
        if self.streaming_buffer is not None and self.streaming_buffer < 1:
            raise UserError(f"streaming_buffer must be >= 1; got {self.streaming_buffer}")
        if self.budget_minutes <= 0:
            raise UserError(f"budget_minutes must be > 0; got {self.budget_minutes}")
        if self.budget_images is not None and self.budget_images < 1:
            raise UserError(f"budget_images must be >= 1; got {self.budget_images}")
        if self.num_samples < 20:
            raise UserError(f"num_samples must be >= 20; got {self.num_samples}")
        if self.sample_sets < 1:
            raise UserError(f"sample_sets must be >= 1; got {self.sample_sets}")
        if self.sample_sets > 1 and self.num_samples >= SET_STRIDE:
            raise UserError(f"with sample_sets > 1, num_samples must be < {SET_STRIDE} (sample set k starts at seed "
                            f"seed + {SET_STRIDE} * k); got {self.num_samples}")
        if self.ema_sigma_rels:
            check_sigma_rels(self.ema_sigma_rels, "--ema_sigma_rel")
        check_guidance_interval(self.guidance_interval)

    @property
    def training_seed(self) -> int:
        return self.seed if self.train_seed is None else self.train_seed

    def sampler_for(self, recipe: dict) -> str:
        """The scoring sampler of a variant: `sampler`, or its EDM counterpart for an EDM-trained variant."""
        return EDM_SAMPLERS.get(self.sampler, self.sampler) if recipe.get("objective") == "edm" else self.sampler


def _run_train(config: Path, extra: list[str], log: Path) -> float:
    """Run `flowers-ddpm train --config config` in a fresh process; wall-clock seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                     os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, "-m", "flowers_ddpm.cli", "train", "--config", str(config), *extra],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"training failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - start


def _logged_images_per_sec(run_dir: Path) -> float:
    """Steady-state images/s from the run log, skipping the first interval (it holds the warm-up)."""
    rows = read_records(run_dir)
    rates = [r["images_per_sec"] for r in rows[1:]] or [rows[-1]["images_per_sec"]]
    return sum(rates) / len(rates)


def _write_config(folder: Path, recipe: dict, data: beds.BedData, settings: AblationSettings,
                  conditional: bool = True) -> Path:
    values = {
        "model_preset": settings.model_preset,
        **{k: v for k, v in recipe.items() if v is not None},
        "train_data_dir": str(data.train_dir), "resolution": settings.resolution, "class_conditional": conditional,
        "center_crop": True, "random_flip": data.random_flip,
        "decode_cache": settings.streaming_buffer is None,
        "decode_cache_dir": str(settings.output_dir / "decode_cache"),
        "shuffle_buffer_size": settings.streaming_buffer or 2048, "seed": recipe.get("seed", settings.training_seed),
        "logger": "none", "logging_steps": 4,
        "output_dir": str(folder / "run"), "sample_scheduler": settings.sampler_for(recipe),
        "ddpm_num_inference_steps": settings.sampler_steps, "eval_batch_size": 10,
        "sample_guidance_scale": settings.guidance_scale,
    }
    if recipe.get("snr_gamma") is None:
        values.pop("snr_gamma", None)
    if conditional and settings.guidance_interval is not None:  # the grids and the export guide as scored
        values["sample_guidance_interval"] = list(settings.guidance_interval)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def training_flops_per_image(recipe: dict, settings: AblationSettings) -> float:
    """Forward + backward FLOPs per training image of a variant's UNet (torch.utils.flop_counter)."""
    overrides = dict(recipe.get("unet_config") or {})
    model = build_unet(recipe.get("model_preset", settings.model_preset), settings.resolution, overrides)
    x = torch.randn(2, 3, settings.resolution, settings.resolution)
    with FlopCounterMode(display=False) as counter:  # a class embedding costs next to nothing: left out
        model(x, torch.tensor([10, 500])).sample.square().mean().backward()
    return counter.get_total_flops() / 2


def plan_steps(config: Path, folder: Path, recipe: dict, settings: AblationSettings) -> tuple[int, Optional[float]]:
    """Optimizer steps that fit the budget; and the probe's images/s (None for a compute budget).

    A wall-clock budget is sized by a probe run of the same variant on this machine. A compute budget
    (`budget_images`) gives every variant the training FLOPs of `budget_images` images of the candidate's UNet,
    which does not depend on how busy the machine is.
    """
    if settings.budget_images is not None:
        ratio = training_flops_per_image(CANDIDATE, settings) / training_flops_per_image(recipe, settings)
        return max(int(settings.budget_images * ratio / recipe["train_batch_size"]), 1), None
    probe = folder / "probe"
    _run_train(config, ["--max_train_steps", str(settings.probe_steps), "--output_dir", str(probe),
                        "--checkpointing_steps", "100000", "--save_images_steps", "100000"], folder / "probe.log")
    rate = _logged_images_per_sec(probe)
    steps = int(settings.budget_minutes * 60 * rate / recipe["train_batch_size"])
    return max(steps, 1), rate


def balanced_subset(labels: torch.Tensor, count: int, num_classes: int = 10) -> torch.Tensor:
    """Indices of the first count/num_classes examples of each class: the same class mix as the samples (image i
    is of class i % num_classes), so the real-vs-real baseline is not inflated by a different mix of classes."""
    if count % num_classes:
        raise UserError(f"num_samples must be a multiple of the bed's {num_classes} classes (the same count of "
                        f"every class); got {count}")
    per_class = count // num_classes
    picks = [torch.nonzero(labels == c)[:per_class, 0] for c in range(num_classes)]
    if min(len(p) for p in picks) < per_class:
        raise UserError(f"num_samples {count} needs {per_class} held-out images of every class; use at most "
                        f"{num_classes * min(len(p) for p in picks)}")
    return torch.cat(picks)


class Scorer:
    """Scores a pipeline's samples with the bed's classifier (the judge)."""

    def __init__(self, data: beds.BedData, settings: AblationSettings):
        cache = settings.cache_dir or settings.output_dir / "classifier"
        self.classifier, self.classifier_accuracy = beds.train_classifier(data, cache, settings.classifier_epochs,
                                                                          settings.seed)
        self.num_classes = data.num_classes
        train, _ = beds.load_folder(data.train_dir)
        test, test_labels = beds.load_folder(data.test_dir)
        self.reference = beds.predict(self.classifier, train)[0]
        subset = balanced_subset(test_labels, settings.num_samples, data.num_classes)
        held_out = beds.predict(self.classifier, test[subset])[0]

        self.real_vs_real = frechet_distance(self.reference, held_out)
        self.settings = settings

    def score(self, pipeline_dir: Path, grid_path: Path, sampler: str, conditional: bool = True) -> dict:
        """Frechet distance of `num_samples` samples and its ratio to the real-vs-real baseline, and for
        class-conditional ones the class accuracy (image i asks for class i % num_classes); unconditional samples
        get no class accuracy (None). With `sample_sets` K > 1 these are means over K sample sets (seeds
        SET_STRIDE apart), and `frechet_ratio_sets` and `class_accuracy_sets` hold each set's; the grid is the first
        set's."""
        s = self.settings
        pipe = load_pipeline(str(pipeline_dir), torch.device("cpu"))
        labels = ({"class_labels": list(range(self.num_classes)), "guidance_scale": s.guidance_scale,
                   "guidance_interval": s.guidance_interval} if conditional else {})
        frechets, accuracies, sample_sec = [], [], 0.0
        for k in range(s.sample_sets):
            start = time.perf_counter()
            images = generate(pipe, s.num_samples, s.sampler_steps, s.seed + k * SET_STRIDE, sampler, batch_size=100,
                              progress=True, **labels)
            sample_sec += time.perf_counter() - start
            if k == 0:
                image_grid(images[:100]).save(grid_path)
            frechet, accuracy = self._judge(images)
            frechets.append(frechet)
            accuracies.append(accuracy)
        ratios = [frechet / self.real_vs_real for frechet in frechets]
        interval = guidance_in_effect(pipe, guidance_interval=s.guidance_interval)[1] if conditional else None
        row = {"frechet": fmean(frechets), "frechet_ratio": fmean(ratios),
               "class_accuracy": fmean(accuracies) if conditional else None,
               "guidance": guidance_label(conditional, interval),
               "sample_images_per_sec": s.num_samples * s.sample_sets / sample_sec}
        if s.sample_sets > 1:
            row.update(zip(SET_KEYS, (ratios, accuracies if conditional else None)))
        return row

    def _judge(self, images: list) -> tuple[float, float]:
        """Frechet distance of one sample set to the training images, and the classifier's accuracy on the
        requested classes."""
        features, predicted = beds.predict(self.classifier, images_to_tensor(images))
        requested = torch.arange(len(images)) % self.num_classes
        return frechet_distance(self.reference, features), float((predicted == requested).float().mean())


def guidance_label(conditional: bool, interval: Optional[Sequence[float]]) -> Optional[str]:
    """How a row's samples were guided, for the table (`interval_label`), or None for unconditional samples."""
    return interval_label(interval) if conditional else None


def variant_folder(name: str, conditional: bool) -> str:
    """A variant's folder under output_dir: its name, with `-uncond` for the unconditional run."""
    return name if conditional else f"{name}-uncond"


def run_variant(name: str, data: beds.BedData, scorer: Scorer, settings: AblationSettings,
                conditional: bool = True) -> dict:
    """Probe, train for the budget, score; the result is kept in <output_dir>/<folder>/result.json."""
    folder = settings.output_dir / variant_folder(name, conditional)
    result_path = folder / "result.json"
    if result_path.is_file():  # finished in an earlier, interrupted run of the ablation
        return json.loads(result_path.read_text())
    for leftover in ("run", "probe"):  # an unfinished variant starts over: its budget must be spent in one go
        shutil.rmtree(folder / leftover, ignore_errors=True)
    recipe = variant_settings(name, conditional)
    config = _write_config(folder, recipe, data, settings, conditional)
    steps, probe_rate = plan_steps(config, folder, recipe, settings)
    logger.info("%s: %d steps planned (probe: %s images/s)", name, steps, probe_rate)
    seconds = _run_train(config, ["--max_train_steps", str(steps), "--checkpointing_steps", str(steps),
                                  "--save_images_steps", str(steps), *_phema_flags(settings, steps)],
                         folder / "train.log")
    run_dir = folder / "run"
    losses = read_records(run_dir)
    sampler = settings.sampler_for(recipe)
    row = {"variant": name, "changes": describe(name), "conditioning": "class" if conditional else "none",
           "sampler": sampler, "steps": steps,
           "train_images": steps * recipe["train_batch_size"],
           "images_per_sec": _logged_images_per_sec(run_dir), "train_sec": seconds,
           "final_loss": losses[-1]["loss"], "real_vs_real": scorer.real_vs_real,
           **scorer.score(run_dir / "pipeline", folder / "grid.png", sampler, conditional)}
    ema_rows = _score_ema_lengths(row, folder, scorer, settings, sampler, conditional)
    if ema_rows:
        atomic_write_text(folder / EMA_RESULTS, json.dumps(ema_rows, indent=2))
    atomic_write_text(result_path, json.dumps(row, indent=2))  # a half-written result would count as finished
    return row


# EDM2's two stored profiles (Karras et al. 2024); any length between and around them is reconstructed from them
PHEMA_PROFILES = "0.05,0.1"
PHEMA_SNAPSHOTS = 16  # snapshots per run (and one at the end)
EMA_RESULTS = "result-ema.json"  # beside result.json: the rows of the post-hoc EMA lengths


def _phema_flags(settings: AblationSettings, steps: int) -> list[str]:
    """With `ema_sigma_rels`, every variant keeps post-hoc EMA snapshots (so all rows pay its small cost)."""
    if not settings.ema_sigma_rels:
        return []
    return ["--phema_sigma_rel", PHEMA_PROFILES, "--phema_snapshot_steps", str(max(steps // PHEMA_SNAPSHOTS, 1))]


def _score_ema_lengths(row: dict, folder: Path, scorer: Scorer, settings: AblationSettings, sampler: str,
                       conditional: bool) -> list[dict]:
    """One row per post-hoc EMA length: the variant's run with its EMA weights replaced by the reconstruction
    (`flowers-ddpm ema-reconstruct`), scored like the run's own export; training figures are the run's."""
    if not settings.ema_sigma_rels:
        return []
    run_dir = folder / "run"
    export_reconstructions(run_dir, settings.ema_sigma_rels)
    rows = []
    for sigma_rel in settings.ema_sigma_rels:
        scored = scorer.score(reconstruction_folder(run_dir, sigma_rel), folder / f"grid-sigma_rel-{sigma_rel:g}.png",
                              sampler, conditional)
        rows.append({**row, **scored, "variant": f"{row['variant']}@sigma_rel-{sigma_rel:g}",
                     "changes": f"{row['changes']}; post-hoc EMA sigma_rel {sigma_rel:g}"})
    return rows


def variant_rows(folder: Path) -> list[dict]:
    """A finished variant's rows: its own (result.json), then those of its post-hoc EMA lengths."""
    ema = folder / EMA_RESULTS
    own = json.loads((folder / "result.json").read_text())
    return [own, *(json.loads(ema.read_text()) if ema.is_file() else [])]


COLUMNS = ("variant", "changes", "conditioning", "sampler", "guidance", "steps", "train_images", "images_per_sec", "train_sec",
           "final_loss", "frechet", "real_vs_real", "frechet_ratio", "class_accuracy")
RANGE_COLUMN = "ratio_range"  # after frechet_ratio in tables of several sample sets: lowest-highest set's ratio


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _ratio_range(row: dict) -> Optional[str]:
    ratios = row.get("frechet_ratio_sets")
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else None


def write_table(rows: list[dict], output_dir: Path) -> Path:
    """results.md (markdown) and results.csv with one row per variant. Rows scored over several sample sets show
    their means, and a ratio_range column with the lowest and highest set's Frechet ratio (explained under the
    markdown table)."""
    columns, note = COLUMNS, ""
    sets = max((len(row.get("frechet_ratio_sets") or ()) for row in rows), default=0)
    if sets:
        at = COLUMNS.index("frechet_ratio") + 1
        columns = (*COLUMNS[:at], RANGE_COLUMN, *COLUMNS[at:])
        rows = [{**row, RANGE_COLUMN: _ratio_range(row)} for row in rows]
        note = (f"\nfrechet, frechet_ratio and class_accuracy are means over {sets} sample sets (seeds "
                f"{SET_STRIDE} apart); {RANGE_COLUMN}: the lowest and highest set's frechet_ratio.\n")
    with open(output_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    path = output_dir / "results.md"
    path.write_text(markdown_table(rows, [(c, c) for c in columns], lambda key, value: _cell(value)) + note)
    return path


def _comparable(settings: AblationSettings) -> dict:
    """The settings every row of one table must share (the variant list may grow between runs)."""
    values = json.loads(json.dumps(asdict(settings), default=str))
    # without post-hoc EMA lengths, a guidance interval or several sample sets the settings read as before they
    # existed, so older folders can be added to (saved_settings reads a missing key as the default)
    return {k: v for k, v in values.items()
            if k != "variants" and not (k in ("ema_sigma_rels", "guidance_interval") and not v)
            and not (k == "sample_sets" and v == 1)}


def saved_settings(output_dir: Path) -> AblationSettings:
    """The settings of the ablation in `output_dir`, read back from the settings.json that run_ablation wrote
    (the inverse of _comparable; the variant list is not kept there)."""
    known = {f.name for f in fields(AblationSettings)}
    settings = AblationSettings(**{k: v for k, v in json.loads((output_dir / "settings.json").read_text()).items()
                                   if k in known})
    settings.output_dir = Path(settings.output_dir)
    settings.cache_dir = settings.cache_dir and Path(settings.cache_dir)
    return settings


def _check_same_settings(settings: AblationSettings) -> None:
    path = settings.output_dir / "settings.json"
    if path.is_file() and json.loads(path.read_text()) != _comparable(settings):
        old = json.loads(path.read_text())
        changed = sorted(k for k, v in _comparable(settings).items() if old.get(k) != v)
        raise UserError(f"{settings.output_dir} holds an ablation with other settings ({', '.join(changed)}); "
                        "use another --output_dir")


def run_ablation(settings: AblationSettings) -> list[dict]:
    """Run every variant (skipping finished ones), write the table and per-variant grids; return the rows."""
    settings.validate()
    _check_same_settings(settings)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    (settings.output_dir / "settings.json").write_text(json.dumps(_comparable(settings), indent=2))
    data = beds.write_bed(settings.bed, settings.output_dir / settings.bed, settings.resolution, settings.seed,
                          settings.bed_path)
    scorer = Scorer(data, settings)
    judge = {"bed": settings.bed, "classifier_held_out_accuracy": scorer.classifier_accuracy,
             "real_vs_real": scorer.real_vs_real, "held_out_images": settings.num_samples}
    atomic_write_text(settings.output_dir / "judge.json", json.dumps(judge, indent=2))
    logger.info("%s classifier held-out accuracy %.3f; real-vs-real Frechet %.3f", settings.bed,
                scorer.classifier_accuracy, scorer.real_vs_real)
    runs = [(name, mode == "class") for mode in settings.conditioning for name in settings.variants]
    # rows finished by earlier invocations into this folder (same settings, checked above) stay in the table
    ran = {variant_folder(name, conditional) for name, conditional in runs}
    earlier = [row for path in sorted(settings.output_dir.glob("*/result.json")) if path.parent.name not in ran
               for row in variant_rows(path.parent)]
    rows = []
    for name, conditional in tqdm(runs, desc="variants", dynamic_ncols=True):
        run_variant(name, data, scorer, settings, conditional)
        rows += variant_rows(settings.output_dir / variant_folder(name, conditional))
        write_table(rows + earlier, settings.output_dir)
    return rows
