"""Sampler x steps x guidance on one finished model of a recipe ablation, scored by that ablation's judge
(`scripts/sampler_table.py`; docs/sampling.md): every cell samples the variant's exported pipeline again with the
ablation's sample count and seeds (or seeds from its own first seed) and is scored through the ablation's own
Scorer, so the numbers are comparable with the ablation's rows."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Optional

from diffusers import DDPMScheduler, UNet2DModel

from .._util.atomic import atomic_write_text
from ..errors import UserError
from ..pipelines.sampling import check_sampler_steps, make_scheduler
from . import beds
from .ablation import Scorer, saved_settings

Cell = tuple[str, int, float, int]  # sampler, steps, guidance scale, first seed


def parse_cell(text: str) -> Cell:
    """SAMPLER:STEPS:GUIDANCE[:SEED] (seed: of the first sample; default 0, the ablation's)."""
    try:
        name, steps, guidance, *seed = text.split(":")
        if len(seed) > 1:
            raise ValueError
        return name, int(steps), float(guidance), int(seed[0]) if seed else 0
    except ValueError:
        raise UserError(f"a cell is SAMPLER:STEPS:GUIDANCE[:SEED] (e.g. ddim:25:1.5); got {text!r}") from None


def check_cells(cells: list[Cell], pipeline: Path) -> None:
    """Every cell's sampler and step count can sample this model, checked before the judge is trained (the
    same checks sampling makes, one sentence each)."""
    config = DDPMScheduler.load_config(pipeline, subfolder="scheduler")  # any family's: only the dict is read
    for name, steps, _, _ in cells:
        check_sampler_steps(make_scheduler(name, config), steps)


def is_class_conditional(pipeline: Path) -> bool:
    """Whether the exported UNet takes class labels (diffusers' config key; unconditional exports have none)."""
    return UNet2DModel.load_config(pipeline, subfolder="unet").get("num_class_embeds") is not None


def table(rows: list[dict]) -> str:
    """One row per sampler and step count, one column per guidance scale: class accuracy / Frechet ratio (of the
    ablation's seeds; cells of other seeds are left out; '-' for the class accuracy of unconditional samples)."""
    rows = [r for r in rows if not r.get("seed")]
    scales = sorted({r["guidance_scale"] for r in rows})
    lines = ["| sampler | steps | " + " | ".join(f"guidance {g:g}" for g in scales) + " |",
             "| --- | --- | " + " | ".join("---" for _ in scales) + " |"]
    for name, steps in dict.fromkeys((r["sampler"], r["steps"]) for r in rows):
        cells = {r["guidance_scale"]: r for r in rows if (r["sampler"], r["steps"]) == (name, steps)}
        shown = [f"{_accuracy(cells[g])} / {cells[g]['frechet_ratio']:.2f}x" if g in cells else "-" for g in scales]
        lines.append(f"| {name} | {steps} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def _accuracy(row: dict) -> str:
    return "-" if row["class_accuracy"] is None else f"{row['class_accuracy']:.2f}"


def run_sampler_table(ablation_dir: Path, variant: str, cells: list[Cell], output_dir: Optional[Path] = None,
                      on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Score every cell not already in <output_dir>/results.json (default <ablation_dir>/<variant>/samplers) and
    return all rows; `on_row` sees each new one. Every mistake a user can make is a UserError raised before the
    judge is trained or anything sampled."""
    saved = ablation_dir / "settings.json"
    pipeline = ablation_dir / variant / "run" / "pipeline"
    if not saved.is_file() or not pipeline.is_dir():
        raise UserError(f"{ablation_dir} holds no finished ablation variant {variant} "
                        f"({saved.name} and {variant}/run/pipeline)")
    conditional = is_class_conditional(pipeline)
    check_cells(cells, pipeline)
    if not conditional and any(guidance for _, _, guidance, _ in cells):
        raise UserError(f"{variant} is an unconditional model, which has no guidance: give its cells as "
                        f"SAMPLER:STEPS:0")
    settings = saved_settings(ablation_dir)
    data = beds.write_bed(settings.bed, settings.output_dir / settings.bed, settings.resolution, settings.seed,
                          settings.bed_path)
    scorer = Scorer(data, settings)

    out = output_dir or ablation_dir / variant / "samplers"
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    for name, steps, guidance, seed in cells:
        if any((r["sampler"], r["steps"], r["guidance_scale"], r.get("seed", 0)) == (name, steps, guidance, seed)
               for r in rows):
            continue
        # the seed only changes the samples: the judge and the real-vs-real baseline were set up with the ablation's
        scorer.settings = dataclasses.replace(settings, sampler_steps=steps, guidance_scale=guidance, seed=seed)
        load = os.getloadavg()[0]
        row = scorer.score(pipeline, out / f"{name}-{steps}-g{guidance:g}{f'-seed{seed}' if seed else ''}.png", name,
                           conditional=conditional)
        row.update(sampler=name, steps=steps, guidance_scale=guidance, seed=seed, real_vs_real=scorer.real_vs_real,
                   load_before=load, load_after=os.getloadavg()[0])
        rows.append(row)
        on_row(row)
        atomic_write_text(results_path, json.dumps(rows, indent=1))
    return rows
