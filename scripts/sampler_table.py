"""Sampler x steps x guidance on one model of a recipe ablation, scored by that ablation's judge.

    python scripts/recipe_ablation.py --bed cifar10-5k --bed_path ../shared/data/cifar10-5k.npz \
        --output_dir abl-cifar --budget_images 3000 --num_samples 100 --variants small-data
    python scripts/sampler_table.py --ablation_dir abl-cifar --variant small-data --output_dir cifar-samplers \
        --cells ddim:25:1.5 ddim:50:1.5 dpmsolver++:20:1.5 ddpm:100:1.5 ddim:25:1.5:100

Each cell is SAMPLER:STEPS:GUIDANCE[:SEED]; the variant's exported pipeline is sampled again for every cell with
the ablation's sample count and seeds (or seeds from SEED on) and scored with its classifier (class accuracy,
Frechet distance in its features over the real-vs-real baseline) through the ablation's own scoring code
(flowers_ddpm.experiments.ablation.Scorer). An unconditional variant (`--variant small-data-uncond`) has no
guidance and no class accuracy: its cells are SAMPLER:STEPS:0 and its table shows the Frechet ratio only. Results go to --output_dir (default <ablation_dir>/<variant>/samplers):
results.json (cells already there are skipped on a rerun) and one grid PNG per cell; a markdown table (class
accuracy / Frechet ratio) is printed. See docs/sampling.md.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from flowers_ddpm._util.atomic import atomic_write_text
from flowers_ddpm.errors import UserError
from flowers_ddpm.experiments import beds
from flowers_ddpm.experiments.ablation import AblationSettings, Scorer
from flowers_ddpm.pipelines.sampling import check_sampler_steps, make_scheduler


def parse_cell(text: str) -> tuple[str, int, float, int]:
    """SAMPLER:STEPS:GUIDANCE[:SEED] (seed: of the first sample; default 0, the ablation's)."""
    try:
        name, steps, guidance, *seed = text.split(":")
        if len(seed) > 1:
            raise ValueError
        return name, int(steps), float(guidance), int(seed[0]) if seed else 0
    except ValueError:
        raise UserError(f"a cell is SAMPLER:STEPS:GUIDANCE[:SEED] (e.g. ddim:25:1.5); got {text!r}") from None


def check_cells(cells: list[tuple[str, int, float, int]], pipeline: Path) -> None:
    """Every cell's sampler and step count can sample this model, checked before the judge is trained (the
    same checks sampling makes, one sentence each)."""
    config = json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())
    for name, steps, _, _ in cells:
        check_sampler_steps(make_scheduler(name, config), steps)


def is_class_conditional(pipeline: Path) -> bool:
    """Whether the exported UNet takes class labels (diffusers' config key; unconditional exports have none)."""
    return json.loads((pipeline / "unet" / "config.json").read_text()).get("num_class_embeds") is not None


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


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablation_dir", required=True, type=Path)
    parser.add_argument("--variant", default="small-data",
                        help="a variant folder of the ablation (NAME, or NAME-uncond for an unconditional run)")
    parser.add_argument("--cells", nargs="+", required=True, help="SAMPLER:STEPS:GUIDANCE")
    parser.add_argument("--output_dir", type=Path, help="default: <ablation_dir>/<variant>/samplers")
    args = parser.parse_args(argv)
    try:
        cells = [parse_cell(c) for c in args.cells]
        saved = args.ablation_dir / "settings.json"
        pipeline = args.ablation_dir / args.variant / "run" / "pipeline"
        if not saved.is_file() or not pipeline.is_dir():
            raise UserError(f"{args.ablation_dir} holds no finished ablation variant {args.variant} "
                            f"({saved.name} and {args.variant}/run/pipeline)")
        conditional = is_class_conditional(pipeline)
        check_cells(cells, pipeline)
        if not conditional and any(guidance for _, _, guidance, _ in cells):
            raise UserError(f"{args.variant} is an unconditional model, which has no guidance: give its cells as "
                            f"SAMPLER:STEPS:0")
        fields = {f.name for f in dataclasses.fields(AblationSettings)}
        settings = AblationSettings(**{k: v for k, v in json.loads(saved.read_text()).items() if k in fields})
        settings.output_dir = Path(settings.output_dir)
        settings.cache_dir = settings.cache_dir and Path(settings.cache_dir)
        data = beds.write_bed(settings.bed, settings.output_dir / settings.bed, settings.resolution, settings.seed,
                              settings.bed_path)
        scorer = Scorer(data, settings)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.output_dir or args.ablation_dir / args.variant / "samplers"
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
        row.update(sampler=name, steps=steps, guidance_scale=guidance, seed=seed, frechet_ratio=row["frechet"] /
                   scorer.real_vs_real, real_vs_real=scorer.real_vs_real, load_before=load,
                   load_after=os.getloadavg()[0])
        rows.append(row)
        print(json.dumps(row), flush=True)
        atomic_write_text(results_path, json.dumps(rows, indent=1))
    print(table(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
