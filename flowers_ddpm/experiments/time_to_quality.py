"""Time to quality (issue 18): how long the small-data recipe and diffusers' example defaults take to reach a fixed
sample quality on the same UNet, data and machine.

Each recipe is one real `flowers-ddpm train` run (a subprocess, as in the recipe ablation) on the ablation's bed
for the same number of training images, exporting its pipeline every `export_every_images` images and keeping
every export (`--keep_exports`). After the run, the exports are judged in order with the ablation's judge
(`ablation.Scorer`: Frechet distance in the bed classifier's feature space, divided by the real-vs-real Frechet
distance of held-out images) until the strictest threshold is reached; later exports cannot change when a
threshold was first reached, so they are not sampled. For each threshold the result names the first export at or
below it: its training images and the wall-clock the trainer had run by then (`training_seconds` of the export's
training_info.json: the trainer's clock from its first step, exports and the checkpoint included; process start-up
is not). A threshold that a run never reaches is reported as not reached within the budget: the ratio of the two
times is then only a lower bound (`>`).

Training images to a threshold do not depend on the machine's load; the wall-clock does (the runs record the load
average before and after).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from .._util.atomic import atomic_write_text
from .._util.tables import markdown_table
from ..config.sections import MIXED_PRECISION
from ..errors import UserError
from . import ablation, beds

logger = logging.getLogger(__name__)

RECIPES = ("small-data", "diffusers-defaults")  # the recipe, then the reference
EXPORT_PATTERN = "step-*"


@dataclass
class TimeToQualitySettings:
    """What the time-to-quality runs add to the ablation's settings (bed, judge, UNet, sampler)."""

    budget_images: int = 8000  # training images of each run
    export_every_images: int = 1000
    thresholds: tuple = (50.0, 20.0, 10.0, 5.0)  # Frechet ratios (Frechet / real-vs-real); the last is the headline
    mixed_precision: str = "auto"  # the same setting for both runs

    def validate(self, recipes: dict) -> None:
        if self.budget_images < 1 or self.export_every_images < 1:
            raise UserError(f"budget_images and export_every_images must be >= 1; got {self.budget_images} and "
                            f"{self.export_every_images}")
        for name, recipe in recipes.items():
            batch = recipe["train_batch_size"]
            if self.export_every_images % batch or self.budget_images % self.export_every_images:
                raise UserError(f"export_every_images ({self.export_every_images}) must be a multiple of every "
                                f"recipe's batch ({name}: {batch}) and divide budget_images ({self.budget_images})")
        if not self.thresholds or min(self.thresholds) <= 0:
            raise UserError(f"thresholds must be positive Frechet ratios; got {self.thresholds}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}; got {self.mixed_precision}")


def _export_step(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def judge_exports(run_dir: Path, scorer: ablation.Scorer, sampler: str, thresholds: tuple, batch_size: int,
                  grids: Path) -> list[dict]:
    """One row per judged export, in training order, until the strictest threshold is reached. Scored over several
    sample sets, a row holds the means and each set's values (`frechet_ratio_sets`, `class_accuracy_sets`)."""
    rows = []
    exports = sorted((run_dir / "exports").glob(EXPORT_PATTERN), key=_export_step)
    for folder in tqdm(exports, desc=f"judging {run_dir.parent.name}", dynamic_ncols=True):
        info = json.loads((folder / "training_info.json").read_text())
        step = _export_step(folder)
        score = scorer.score(folder, grids / f"step-{step:07d}.png", sampler)
        rows.append({"step": step, "train_images": step * batch_size, "training_seconds": info["training_seconds"],
                     "frechet": score["frechet"], "frechet_ratio": score["frechet_ratio"],
                     "class_accuracy": score["class_accuracy"],
                     **{key: score[key] for key in ablation.SET_KEYS if key in score}})  # with --sample_sets K > 1
        if rows[-1]["frechet_ratio"] <= min(thresholds):
            break
    return rows


def first_reached(rows: list[dict], threshold: float) -> Optional[dict]:
    """The first judged export whose Frechet ratio is at or below `threshold` (None when none is)."""
    return next((row for row in rows if row["frechet_ratio"] <= threshold), None)


def run_recipe(name: str, data: beds.BedData, scorer: ablation.Scorer, settings: ablation.AblationSettings,
               ttq: TimeToQualitySettings) -> dict:
    """Train recipe `name` for the budget with kept exports, judge them; cached in <folder>/result.json."""
    folder = settings.output_dir / f"ttq-{name}"
    result_path = folder / "result.json"
    if result_path.is_file():  # finished in an earlier, interrupted run
        return json.loads(result_path.read_text())
    shutil.rmtree(folder / "run", ignore_errors=True)  # an unfinished run starts over: its clock must be one run's
    recipe = ablation.variant_settings(name)
    batch = recipe["train_batch_size"]
    config = ablation._write_config(folder, {**recipe, "mixed_precision": ttq.mixed_precision}, data, settings)
    steps, every = ttq.budget_images // batch, ttq.export_every_images // batch
    load_before = os.getloadavg()
    process_sec = ablation._run_train(config, ["--max_train_steps", str(steps), "--save_model_steps", str(every),
                                               "--keep_exports", "--checkpointing_steps", str(steps),
                                               "--save_images_steps", str(steps)], folder / "train.log")
    load_after = os.getloadavg()
    run_dir = folder / "run"
    info = json.loads((run_dir / "pipeline" / "training_info.json").read_text())
    sampler = settings.sampler_for(recipe)
    grids = folder / "grids"
    grids.mkdir(exist_ok=True)
    rows = judge_exports(run_dir, scorer, sampler, ttq.thresholds, batch, grids)
    result = {"recipe": name, "batch_size": batch, "learning_rate": recipe["learning_rate"], "steps": steps,
              "train_images": steps * batch, "sampler": sampler, "mixed_precision": info.get("mixed_precision"),
              "training_seconds": info["training_seconds"], "process_seconds": process_sec,
              "images_per_sec": ablation._logged_images_per_sec(run_dir),
              "load_average_before": list(load_before), "load_average_after": list(load_after), "exports": rows}
    atomic_write_text(result_path, json.dumps(result, indent=2))
    return result


def summarise(results: dict, thresholds: tuple) -> list[dict]:
    """Per threshold: training images and wall-clock at which each recipe first reached it, and the ratios of the
    reference's to the recipe's (None where the recipe did not reach it; a lower bound, flagged, where only the
    reference did not)."""
    recipe, reference = (results[name] for name in RECIPES)
    rows = []
    for threshold in thresholds:
        row = {"threshold": threshold}
        for key, result in (("recipe", recipe), ("reference", reference)):
            hit = first_reached(result["exports"], threshold)
            row[f"{key}_images"] = hit["train_images"] if hit else None
            row[f"{key}_seconds"] = hit["training_seconds"] if hit else None
        row["time_ratio"] = row["images_ratio"] = None
        row["lower_bound"] = False
        if row["recipe_seconds"] is not None:
            if row["reference_seconds"] is not None:
                row["time_ratio"] = row["reference_seconds"] / row["recipe_seconds"]
                row["images_ratio"] = row["reference_images"] / row["recipe_images"]
            else:  # not reached within the budget: at least the whole run's time
                row["time_ratio"] = reference["training_seconds"] / row["recipe_seconds"]
                row["images_ratio"] = reference["train_images"] / row["recipe_images"]
                row["lower_bound"] = True
        rows.append(row)
    return rows


TABLE = (("threshold", "Frechet ratio <="), ("recipe_images", "small-data: images"),
         ("recipe_seconds", "small-data: seconds"), ("reference_images", "diffusers defaults: images"),
         ("reference_seconds", "diffusers defaults: seconds"), ("time_ratio", "time ratio"),
         ("images_ratio", "images ratio"))


def _cell(key: str, value, row: dict) -> str:
    if key.endswith("_ratio"):
        return "-" if value is None else f"{'>' if row['lower_bound'] else ''}{value:.1f}x"
    if value is None:
        return "not reached"
    if key == "threshold":
        return f"{value:g}x"
    if key.endswith("images"):
        return f"{value:,}"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def format_table(summary: list[dict]) -> str:
    """The summary as a markdown table (`>`: a lower bound, the reference did not reach it within the budget)."""
    cells = [{key: _cell(key, row[key], row) for key, _ in TABLE} for row in summary]
    return markdown_table(cells, TABLE, right_aligned=[key for key, _ in TABLE])


def write_outputs(results: dict, summary: list[dict], judge: dict, ttq: TimeToQualitySettings, output_dir: Path) -> Path:
    """time_to_quality.json (everything), .csv (every judged export) and .md (the summary table)."""
    document = {"settings": asdict(ttq), "judge": judge, "summary": summary, "runs": results}
    atomic_write_text(output_dir / "time_to_quality.json", json.dumps(document, indent=2))
    rows = [{"recipe": name, **row} for name, result in results.items() for row in result["exports"]]
    columns = ["recipe", "step", "train_images", "training_seconds", "frechet", "frechet_ratio", "class_accuracy"]
    present = [key for key in ablation.SET_KEYS if any(key in row for row in rows)]  # several sample sets only
    with open(output_dir / "time_to_quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns + present)
        writer.writeheader()
        for row in rows:  # each set's value, space-separated, after the means
            writer.writerow({**{key: row[key] for key in columns},
                             **{key: " ".join(f"{v:.4f}" for v in row[key] or ()) for key in present if key in row}})
    path = output_dir / "time_to_quality.md"
    atomic_write_text(path, format_table(summary))
    return path


def run_time_to_quality(settings: ablation.AblationSettings, ttq: TimeToQualitySettings) -> dict:
    """Train and judge both recipes (skipping finished ones); write and return the results."""
    settings = ablation.AblationSettings(**{**asdict(settings), "variants": RECIPES, "conditioning": ("class",)})
    settings.validate()
    ttq.validate({name: ablation.variant_settings(name) for name in RECIPES})
    ablation._check_same_settings(settings)
    own = settings.output_dir / "time_to_quality_settings.json"
    mine = json.loads(json.dumps(asdict(ttq)))  # tuples as lists, as read back
    if own.is_file() and json.loads(own.read_text()) != mine:  # finished runs of another budget must not be reused
        raise UserError(f"{settings.output_dir} holds time-to-quality runs with other settings "
                        f"({json.loads(own.read_text())}); use another --output_dir")
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings.output_dir / "settings.json", json.dumps(ablation._comparable(settings), indent=2))
    atomic_write_text(own, json.dumps(mine, indent=2))
    data = beds.write_bed(settings.bed, settings.output_dir / settings.bed, settings.resolution, settings.seed,
                          settings.bed_path)
    scorer = ablation.Scorer(data, settings)
    judge = {"bed": settings.bed, "classifier_held_out_accuracy": scorer.classifier_accuracy,
             "real_vs_real": scorer.real_vs_real, "held_out_images": settings.num_samples}
    results = {name: run_recipe(name, data, scorer, settings, ttq) for name in RECIPES}
    summary = summarise(results, ttq.thresholds)
    write_outputs(results, summary, judge, ttq, settings.output_dir)
    return {"judge": judge, "summary": summary, "runs": results}
