"""Sampler x steps x guidance on one model of a recipe ablation, scored by that ablation's judge.

    python scripts/recipe_ablation.py --bed cifar10-5k --bed_path ../shared/data/cifar10-5k.npz \
        --output_dir abl-cifar --budget_images 3000 --num_samples 100 --variants small-data
    python scripts/sampler_table.py --ablation_dir abl-cifar --variant small-data --output_dir cifar-samplers \
        --cells ddim:25:1.5 ddim:50:1.5 dpmsolver++:20:1.5 ddpm:100:1.5 ddim:25:1.5:100

Each cell is SAMPLER:STEPS:GUIDANCE[:SEED]; the variant's exported pipeline is sampled again for every cell with
the ablation's sample count and seeds (or seeds from SEED on) and scored with its classifier (class accuracy,
Frechet distance in its features over the real-vs-real baseline) through the ablation's own scoring code
(flowers_ddpm.experiments.ablation.Scorer). An ablation run with `--sample_sets K` scores each cell over K sets
too, set k from seed SEED + 1000k: a SEED that is a multiple of 1000K keeps every set apart from the default
cell's (other seeds below 1000K share samples with them). An unconditional variant (`--variant small-data-uncond`) has no
guidance and no class accuracy: its cells are SAMPLER:STEPS:0 and its table shows the Frechet ratio only.
Results go to --output_dir (default <ablation_dir>/<variant>/samplers): results.json (cells already there are
skipped on a rerun) and one grid PNG per cell; a markdown table (class accuracy / Frechet ratio) is printed.
The work is flowers_ddpm.experiments.sampler_table; see docs/sampling.md.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from flowers_ddpm.errors import UserError
from flowers_ddpm.experiments.sampler_table import parse_cell, run_sampler_table, table


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablation_dir", required=True, type=Path)
    parser.add_argument("--variant", default="small-data",
                        help="a variant folder of the ablation (NAME, or NAME-uncond for an unconditional run)")
    parser.add_argument("--cells", nargs="+", required=True, help="SAMPLER:STEPS:GUIDANCE[:SEED]")
    parser.add_argument("--output_dir", type=Path, help="default: <ablation_dir>/<variant>/samplers")
    args = parser.parse_args(argv)
    try:
        rows = run_sampler_table(args.ablation_dir, args.variant, [parse_cell(c) for c in args.cells],
                                 args.output_dir, on_row=lambda row: print(json.dumps(row), flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
