"""Train recipe variants for the same wall-clock budget on a real test bed and compare their samples.

    python scripts/recipe_ablation.py --budget_minutes 10 --variants diffusers-defaults small-data
    python scripts/recipe_ablation.py --budget_minutes 3 --variants all --output_dir runs/screen
    python scripts/recipe_ablation.py --bed cifar10-5k --bed_path ../shared/data/cifar10-5k.npz \
        --variants small-data edm --conditioning class none --output_dir runs/cifar

Writes <output_dir>/results.md, results.csv and <output_dir>/<variant>/grid.png; rerunning with the same
output_dir skips the variants that already finished. See docs/recipes.md for the measured results.

    python scripts/recipe_ablation.py --time_to_quality --budget_images 8000 --export_every_images 1000 \
        --num_samples 100 --output_dir runs/ttq

trains the small-data recipe and diffusers' example defaults once each instead, keeping an export every
--export_every_images images, and reports the training images and wall-clock at which each first reaches each
--thresholds Frechet ratio (<output_dir>/time_to_quality.{md,json,csv}; docs/benchmarks.md).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from flowers_ddpm.config.recipes import RECIPES
from flowers_ddpm.config.samplers import DDPM_SAMPLERS
from flowers_ddpm.errors import UserError
from flowers_ddpm.experiments.ablation import SET_STRIDE, VARIANTS, AblationSettings, run_ablation
from flowers_ddpm.experiments.time_to_quality import TimeToQualitySettings, format_table, run_time_to_quality


def parse_args(argv=None) -> tuple:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="recipe-ablation", type=Path)
    parser.add_argument("--budget_minutes", type=float, default=10.0, help="training wall-clock budget per variant")
    parser.add_argument("--budget_images", type=int,
                        help="instead of minutes: a compute budget, the training FLOPs of this many images of the "
                             "screening base's UNet (independent of machine load)")
    parser.add_argument("--variants", nargs="+", default=["diffusers-defaults", "small-data"],
                        help=f"'all', or names among diffusers-defaults, {', '.join(RECIPES)}, "
                             f"{', '.join(VARIANTS)}")
    parser.add_argument("--bed", default="digits", choices=("digits", "cifar10-5k"),
                        help="test bed: scikit-learn's digits, or real colour photographs from --bed_path")
    parser.add_argument("--bed_path", type=Path, help="the bed's .npz file (images, labels, class_names); read in place")
    parser.add_argument("--conditioning", nargs="+", default=["class"], choices=("class", "none"),
                        help="train each variant class-conditionally ('class'), unconditionally ('none'), or both")
    parser.add_argument("--num_samples", type=int, default=200,
                        help="samples scored per variant (a multiple of the bed's class count)")
    parser.add_argument("--sample_sets", type=int, default=1, metavar="K",
                        help=f"score each variant on K independent sets of --num_samples samples (set k from "
                             f"sample seed --seed + {SET_STRIDE}k) and report the means and the range of the sets' "
                             f"Frechet ratios: one set's ratio moves by up to ~20%% between sets of the same model")
    parser.add_argument("--sampler", default="dpmsolver++", choices=DDPM_SAMPLERS,
                        help="EDM-trained variants use the EDM counterpart (edm-dpmsolver++, edm-euler)")
    parser.add_argument("--sampler_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=1.5,
                        help="classifier-free guidance of the scored samples (docs/recipes.md: 1.5 balances "
                             "class accuracy and diversity)")
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="class-conditional rows: guidance only at noise levels LO <= sigma <= HI")
    parser.add_argument("--model_preset", default="small")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--probe_steps", type=int, default=12, help="steps of the probe run that sizes the budget")
    parser.add_argument("--classifier_epochs", type=int, default=15, help="epochs of the bed's judge classifier")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bed's split, the judge and the samples")
    parser.add_argument("--train_seed", type=int,
                        help="training seed of every variant (default: --seed); the split, judge and sampling seeds "
                             "stay --seed, so rows of two training seeds are scored alike")
    parser.add_argument("--cache_dir", type=Path, help="where the judge classifier is cached (default: output_dir)")
    parser.add_argument("--ema_sigma_rel", type=float, nargs="+", default=[], metavar="S", dest="ema_sigma_rels",
                        help="also score these post-hoc EMA lengths of every variant (rows <variant>@sigma_rel-S): "
                             "the variants train with post-hoc EMA snapshots (docs/recipes.md)")
    parser.add_argument("--streaming_buffer", type=int, metavar="N",
                        help="train through the streaming data path (the default of flowers-ddpm train) with a "
                             "shuffle buffer of N examples, instead of the decode cache")
    ttq = parser.add_argument_group("time to quality (--time_to_quality)")
    ttq.add_argument("--time_to_quality", action="store_true",
                     help="train small-data and diffusers-defaults for --budget_images images each (default 8000) "
                          "and report when each first reaches each Frechet ratio of --thresholds")
    ttq.add_argument("--export_every_images", type=int, default=1000, help="images between judged exports")
    ttq.add_argument("--thresholds", type=float, nargs="+", default=[50.0, 20.0, 10.0, 5.0],
                     help="Frechet ratios (Frechet / real-vs-real) to report; the last is the headline")
    ttq.add_argument("--mixed_precision", default="auto", help="the training precision of both runs")
    args = parser.parse_args(argv)
    variants = args.variants
    if variants == ["all"]:
        variants = ["diffusers-defaults", *VARIANTS]
    ttq_keys = ("time_to_quality", "export_every_images", "thresholds", "mixed_precision")
    values = {k: v for k, v in vars(args).items() if k not in ttq_keys}
    settings = AblationSettings(**{**values, "variants": tuple(variants), "conditioning": tuple(args.conditioning),
                                   "ema_sigma_rels": tuple(args.ema_sigma_rels),
                                   "guidance_interval": args.guidance_interval and tuple(args.guidance_interval)})
    if not args.time_to_quality:
        return settings, None
    return settings, TimeToQualitySettings(args.budget_images or 8000, args.export_every_images,
                                           tuple(args.thresholds), args.mixed_precision)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings, ttq = parse_args(argv)
        if ttq is not None:
            result = run_time_to_quality(settings, ttq)
            print(json.dumps(result["judge"], indent=2))
            print(format_table(result["summary"]))
            print(f"written to {settings.output_dir / 'time_to_quality.json'} (.csv, .md)")
            return 0
        rows = run_ablation(settings)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((settings.output_dir / "judge.json").read_text())
    print((settings.output_dir / "results.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
