"""The `flowers-ddpm` command: `train`, `sample`, `prepare` and `benchmark`. Thin: parse, then call the module that
does the work."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from .config import SAMPLE_SCHEDULERS, add_train_arguments, parse_train_config
from .errors import UserError


def _train(args: argparse.Namespace) -> None:
    from .train import run_training

    cfg = parse_train_config(args)
    path = run_training(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"pipeline written to {path}")


def _sample(args: argparse.Namespace) -> None:
    import torch

    from .pipeline import generate, image_grid, load_pipeline

    if args.num_images < 1 or args.steps < 1 or args.batch_size < 1:
        raise UserError("num_images, steps and batch_size must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else None
    pipe = load_pipeline(args.model, device, dtype)
    images = generate(pipe, args.num_images, args.steps, args.seed, args.scheduler, args.batch_size)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(args.output)
    if args.output_dir:
        folder = Path(args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(folder / f"{i:05d}.png")
    print(f"wrote {len(images)} images to {args.output}" + (f" and {args.output_dir}/" if args.output_dir else ""))


def _prepare(args: argparse.Namespace) -> None:
    from .cache import open_cache
    from .config import build_config, load_yaml
    from .data import open_source

    values = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
    file_values = load_yaml(args.config) if args.config else {}
    if not {"max_train_steps", "num_epochs"} & (set(values) | set(file_values)):
        values["max_train_steps"] = 1  # the length of training does not matter for the cache
    cfg = build_config(file_values, values)
    images = open_cache(cfg, open_source(cfg))
    print(f"decode cache ready: {len(images)} images ({images.nbytes / 2**20:.1f} MB, {images.skipped} unreadable "
          f"skipped) in {images.folder}")


def _benchmark(args: argparse.Namespace) -> None:
    from .benchmark import format_table, run_benchmark

    results = run_benchmark(args)
    print(format_table(results))
    if args.json:
        print(f"results written to {args.json}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowers-ddpm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a DDPM (run under `accelerate launch` for several processes)")
    add_train_arguments(train)
    train.set_defaults(func=_train)

    sample = sub.add_parser("sample", help="generate images from a pipeline folder or Hub id")
    sample.add_argument("--model", required=True, help="pipeline folder or Hub id")
    sample.add_argument("--num_images", type=int, default=16)
    sample.add_argument("--scheduler", choices=SAMPLE_SCHEDULERS, default=None,
                        help="sampler (default: the pipeline's own scheduler)")
    sample.add_argument("--steps", type=int, default=50, help="sampler steps")
    sample.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    sample.add_argument("--batch_size", type=int, default=16)
    sample.add_argument("--output", default="samples.png", help="grid PNG to write")
    sample.add_argument("--output_dir", default=None, help="also write each image as a PNG here")
    sample.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    sample.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sample.set_defaults(func=_sample)

    prepare = sub.add_parser("prepare", help="build the decode-once cache for a training config (see --decode_cache)")
    add_train_arguments(prepare)
    prepare.set_defaults(func=_prepare)

    from .benchmark import add_benchmark_arguments

    benchmark = sub.add_parser("benchmark", help="measure data-path, training-step and sampling speed")
    add_benchmark_arguments(benchmark)
    benchmark.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    benchmark.set_defaults(func=_benchmark)
    return parser


def _setup_logging() -> None:
    # Read the rank from the launcher's environment: creating accelerate's PartialState here would fix the
    # distributed setup before the Accelerator (which honours ACCELERATE_USE_CPU) is built.
    main = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("flowers_ddpm").setLevel(logging.INFO if main else logging.WARNING)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of `flowers-ddpm`; returns the process exit code."""
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        _setup_logging()
        args.func(args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
