"""The `flowers-ddpm` command: `train`, `train-classifier`, `sample`, `attach-classifier`, `evaluate`, `sweep`,
`push`, `demo`, `prepare` and `benchmark`. Thin: parse, then call the module that does the work.

Each command imports the stage that does its work when it runs, not when this module loads: `--help`, `--version`
and argument errors then answer at once instead of after torch and diffusers have loaded (several seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Optional

from . import __version__
from ._util.ranks import is_main_process
from .config.loading import TRAIN_SECTIONS, add_train_arguments, build_config, load_yaml, parse_train_config
from .config.sections import FIELDS, SAMPLE_SCHEDULERS
from .errors import UserError, user_error_of
from .training.stopping import SignalStop, StopOutsideSteps, TrainingStopped

# SIGTERM/SIGINT during a training command's start-up or end-of-run report (the training steps have their own
# handling, flowers_ddpm.training.stopping.StopRequest)
OUTSIDE_STEPS = dict(where="outside the training steps (during start-up or the end-of-run report)",
                     advice="no training step was lost: rerun with --resume_from_checkpoint latest to continue")


def _check_scales(args: argparse.Namespace, *names: str) -> None:
    """Guidance scales (and other float flags) must be finite and not negative: NaN would pass every comparison
    and sample noise, a negative scale guides away from the class."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{name} must be a finite number >= 0; got {value}")


def _train(args: argparse.Namespace) -> None:
    with StopOutsideSteps(**OUTSIDE_STEPS):  # the imports of the run take seconds: covered too
        from .training.diffusion_run import run_training

        run_training(parse_train_config(args))  # prints a summary of the run, with where the pipeline is


def _train_classifier(args: argparse.Namespace) -> None:
    with StopOutsideSteps(**OUTSIDE_STEPS):
        from .training.classifier_run import run_classifier_training

        cfg = parse_train_config(args)
        path = run_classifier_training(cfg)
    if is_main_process():
        print(f"classifier written to {path}")


def _sample(args: argparse.Namespace) -> None:
    _check_scales(args, "guidance_scale", "classifier_scale")

    import torch

    from .pipelines.conditioning import check_guidance_interval, resolve_conditioning
    from .pipelines.sampling import (default_sampler, generate, image_grid, load_classifier, load_pipeline,
                                     with_classifier)

    if args.num_images < 1 or args.steps < 1 or args.batch_size < 1:
        raise UserError("num_images, steps and batch_size must be >= 1")
    check_guidance_interval(args.guidance_interval)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else None
    classifier = load_classifier(args.classifier, device) if args.classifier else None
    pipe = load_pipeline(args.model, device, dtype, trust_remote_code=args.trust_remote_code)
    if classifier is not None:
        pipe = with_classifier(pipe, classifier)
    labels = resolve_conditioning(pipe, args.class_labels, args.guidance_scale, classifier, args.classifier_scale,
                                  guidance_interval=args.guidance_interval)
    scheduler = args.scheduler or default_sampler(pipe.scheduler.config)
    images = generate(pipe, args.num_images, args.steps, args.seed, scheduler, args.batch_size,
                      class_labels=labels, guidance_scale=args.guidance_scale, classifier=classifier,
                      classifier_scale=args.classifier_scale, progress=True,
                      guidance_interval=args.guidance_interval)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(args.output)
    if args.output_dir:
        folder = Path(args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(folder / f"{i:05d}.png")
    print(f"wrote {len(images)} images to {args.output}" + (f" and {args.output_dir}/" if args.output_dir else ""))


def _ema_reconstruct(args: argparse.Namespace) -> None:
    from .training.phema import check_sigma_rels, export_reconstructions

    check_sigma_rels(args.sigma_rel)
    for path in export_reconstructions(args.run_dir, args.sigma_rel, args.output_dir):
        print(f"pipeline written to {path}")


def _attach_classifier(args: argparse.Namespace) -> None:
    _check_scales(args, "classifier_scale", "guidance_scale")

    from .pipelines.export import attach_classifier

    path = attach_classifier(args.model, args.classifier, args.output, args.classifier_scale, args.guidance_scale)
    print(f"pipeline with classifier written to {path}")


def _add_attach_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="pipeline folder or Hub id (conditional or unconditional)")
    parser.add_argument("--classifier", required=True, metavar="DIR", help="the --output_dir of train-classifier")
    parser.add_argument("--output", required=True, help="pipeline folder to write")
    parser.add_argument("--classifier_scale", type=float, default=1.0, help="the saved default classifier scale")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="the saved default classifier-free guidance scale (class-conditional models; default: "
                             "the model's own saved scale)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")


def _evaluate(args: argparse.Namespace) -> None:
    _check_scales(args, "guidance_scale")

    from .evaluation.command import DATA_SETTINGS, EvaluateOptions, markdown_table, rank_models, run_evaluation
    from .pipelines.conditioning import check_guidance_interval

    if args.steps < 1 or args.batch_size < 1:
        raise UserError("steps and batch_size must be >= 1")
    check_guidance_interval(args.guidance_interval)
    if args.train_data_dir is not None and not Path(args.train_data_dir).is_dir():
        raise UserError(f"train_data_dir {args.train_data_dir} does not exist or is not a directory")
    models = args.model
    options = EvaluateOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvaluateOptions)
                                 if f.name != "model"}, model=models[0])
    data_flags = {name: getattr(args, name) for name in DATA_SETTINGS + ("center_crop",)}
    if len(models) > 1:
        comparison = rank_models(options, models, data_flags)
        if comparison is not None:
            print(Path(args.output).with_suffix(".md").read_text(), end="")
            print(f"best by FID: {comparison['best']} (FID {comparison['ranking'][0]['fid']:.4f}); wrote "
                  f"{args.output} and {Path(args.output).with_suffix('.md')}")
        return
    report = run_evaluation(options, data_flags)
    if report is not None:
        print(markdown_table(report["results"]), end="")
        print(f"wrote {args.output} and {Path(args.output).with_suffix('.md')}")


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, nargs="+",
                        help="pipeline folder or Hub id; several are each evaluated on the same seeds and ranked by "
                             "FID (e.g. the EMA lengths of `ema-reconstruct`: --model RUN/ema-reconstruct/*)")
    _add_metric_arguments(parser, num_images=10000, dinov2_model="facebook/dinov2-base")
    parser.add_argument("--compare_schedulers", action="store_true",
                        help="evaluate DDPM-1000, DDIM-50, DDIM-25, DPM-Solver++-20 and -10 on the same seeds "
                             "(EDM-trained models: EDM Euler-50, EDM DPM-Solver++-50, -20 and -10)")
    parser.add_argument("--output", default="metrics.json", help="JSON report; a markdown table goes next to it (.md)")
    data = parser.add_argument_group("reference data (default: the pipeline's training_config.yaml, else Flowers102)")
    for name in ("dataset_name", "dataset_config_name", "dataset_split", "train_data_dir", "image_column", "cache_dir"):
        data.add_argument(f"--{name}", default=None)
    data.add_argument("--resolution", type=int, default=None, help="default: the UNet's sample size")
    data.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=None,
                      help="center crop (default) or a seeded random crop")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")


def _add_metric_arguments(parser: argparse.ArgumentParser, num_images: int, dinov2_model: str) -> None:
    """How images are generated and measured: shared by `evaluate` and `sweep`."""
    parser.add_argument("--num_images", type=int, default=num_images, help="images to generate (over all processes)")
    parser.add_argument("--scheduler", choices=SAMPLE_SCHEDULERS, default=None,
                        help="sampler (default: by the model's family, as `sample` chooses)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch and process")
    parser.add_argument("--inception_weights", default=None, metavar="PATH",
                        help="FID Inception weights (weights-inception-2015-12-05-6726825d.pth); downloaded when unset")
    parser.add_argument("--dinov2_model", default=dinov2_model,
                        help="transformers DINOv2 for FD-DINOv2 (Hub id or folder); 'none' skips it")
    parser.add_argument("--feature_network", default=None, metavar="MODULE:FUNCTION",
                        help="replace the Inception network by the module a factory returns (numbers then do not "
                             "compare with papers)")
    parser.add_argument("--no-precision_recall", dest="precision_recall", action="store_false",
                        help="skip improved precision/recall")
    parser.add_argument("--reference_cache_dir", default=None,
                        help="where reference features are cached (default: ~/.cache/flowers_ddpm/reference)")
    parser.add_argument("--reference_num_images", type=int, default=None, help="use only the first N real images")
    _add_conditioning_arguments(parser)


def _add_conditioning_arguments(parser: argparse.ArgumentParser,
                                without_labels: str = "every class in turn") -> None:
    parser.add_argument("--class_labels", nargs="+", default=None, metavar="LABEL",
                        help="class-conditional models: classes to draw (indices or names, e.g. sunflower "
                             f"'pink primrose'), image i gets label i mod the number given (default: {without_labels})")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="classifier-free guidance scale: 1 = conditional model, 0 = unconditional, >1 stronger "
                             "(default: the pipeline's saved scale, 1.5 in class-conditional models trained here)")
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="classifier-free guidance only at noise levels LO <= sigma <= HI (sigma = "
                             "sqrt((1 - alpha_bar) / alpha_bar)), the conditional model elsewhere (default: the "
                             "pipeline's saved interval, else every step); docs/sampling.md")


def _sweep(args: argparse.Namespace) -> None:
    _check_scales(args, "guidance_scale")

    if args.search == "grid" and (not args.grid or args.param):
        raise UserError("the grid search takes --grid SETTING=V1,V2 ... (--param is for --search optuna)")
    if args.search == "optuna" and (not args.param or args.grid):
        raise UserError("--search optuna takes --param SETTING=LOW:HIGH ... (--grid is for the grid search)")

    from .evaluation.command import EvaluateOptions
    from .experiments.optuna_search import run_search
    from .experiments.sweep import run_sweep
    from .pipelines.conditioning import check_guidance_interval

    check_guidance_interval(args.guidance_interval)
    evaluation = EvaluateOptions(model="", **{f.name: getattr(args, f.name) for f in dataclasses.fields(EvaluateOptions)
                                             if f.name != "model" and hasattr(args, f.name)})
    overrides = {name: value for name, value in vars(args).items() if name in FIELDS and name not in args.sweep_flags}
    if args.search == "optuna":
        table = run_search(args.config, args.param, args.n_trials, args.max_train_steps, args.output_dir, evaluation,
                           overrides, args.sampler_seed, args.ema_sigma_rel)
    else:
        table = run_sweep(args.config, args.grid, args.max_train_steps, args.output_dir, evaluation, overrides,
                          args.ema_sigma_rel)
    if table is not None:
        print(table.read_text(), end="")
        print(f"wrote {table}, {table.with_suffix('.csv')} and {table.with_suffix('.png')}")


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file with the settings every trial shares")
    parser.add_argument("--search", choices=("grid", "optuna"), default="grid",
                        help="grid: every combination of --grid; optuna: --n_trials trials chosen by Optuna's TPE "
                             "from the --param ranges (needs the optuna extra)")
    parser.add_argument("--grid", nargs="+", default=None, metavar="SETTING=V1,V2",
                        help="training settings to vary; every combination is one trial")
    parser.add_argument("--param", nargs="+", default=None, metavar="SETTING=RANGE",
                        help="--search optuna: ranges to search, e.g. learning_rate=log:1e-4:3e-3 dropout=0:0.3 "
                             "train_batch_size=8:32:8 prediction_type=epsilon,v_prediction")
    parser.add_argument("--n_trials", type=int, default=20,
                        help="--search optuna: finished (complete or pruned) trials the study ends with")
    parser.add_argument("--sampler_seed", type=int, default=0, help="--search optuna: seed of the TPE sampler")
    parser.add_argument("--ema_sigma_rel", type=float, nargs="+", default=None, metavar="S",
                        help="trials trained with --phema_sigma_rel: evaluate these post-hoc EMA lengths (as "
                             "`ema-reconstruct` + `evaluate --model ...`) and report the best by FID as the trial's")
    parser.add_argument("--max_train_steps", type=int, required=True, help="optimizer steps of each trial")
    parser.add_argument("--output_dir", default=None,
                        help="the sweep's folder (default: the config's output_dir + '-sweep')")
    evaluation = parser.add_argument_group("evaluation of each trial (as in `flowers-ddpm evaluate`)")
    _add_metric_arguments(evaluation, num_images=1000, dinov2_model="none")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    # training settings as flags, over the YAML and under the grid; the sweep's own flags keep their meaning
    # (--seed is the evaluation seed: vary the training seed with --grid seed=0,1 or set it in the YAML)
    own = tuple(action.dest for action in parser._actions)
    add_train_arguments(parser, exclude=own, config_flag=False)
    parser.set_defaults(sweep_flags=own)


def _push(args: argparse.Namespace) -> None:
    from .publish.hub import push_pipeline, stage_upload
    from .publish.space import check_repo_id, push_space, stage_space

    if args.space_id:
        check_repo_id(args.space_id, "--space_id")
        if args.revision not in (None, "main"):
            raise UserError("--space_id: the Space serves the model's main branch; push it without --revision")
    if args.dry_run:
        if not args.staging_dir:  # kept after the command ends, for the user to look at
            args.staging_dir = tempfile.mkdtemp(prefix="flowers-ddpm-push-")
        files = stage_upload(args.model, args.staging_dir, args.repo_id, args.license, args.space_id)
        print(f"dry run: would upload {len(files)} files from {args.staging_dir} to {args.repo_id}:")
        print("\n".join(f"  {name}" for name in files))
        if args.space_id:
            space_dir = args.space_staging_dir or f"{args.staging_dir.rstrip('/')}-space"
            files = stage_space(args.space_id, args.repo_id, space_dir, args.license)
            print(f"dry run: would upload {len(files)} files from {space_dir} to the Space {args.space_id}:")
            print("\n".join(f"  {name}" for name in files))
        return
    url = push_pipeline(args.model, args.repo_id, private=args.private, revision=args.revision,
                        commit_message=args.commit_message, license=args.license, staging_dir=args.staging_dir,
                        space_id=args.space_id)
    print(f"pushed to {url}")
    if args.space_id:
        url = push_space(args.space_id, args.repo_id, private=args.private, license=args.license,
                         staging_dir=args.space_staging_dir)
        print(f"pushed the demo Space to {url}")


def _demo(args: argparse.Namespace) -> None:
    from .demo.app import launch_demo

    launch_demo(args.model, host=args.host, port=args.port, share=args.share, device=args.device)


def _true_or_false(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="pipeline folder or Hub id (anything `sample` loads)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", type=_true_or_false, nargs="?", const=True, default=False, metavar="true|false",
                        help="also serve through a temporary public gradio.live link (default: false)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")


def _prepare(args: argparse.Namespace) -> None:
    from .data.cache import open_cache
    from .data.stream import open_source

    values = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
    file_values = load_yaml(args.config) if args.config else {}
    if not {"max_train_steps", "num_epochs"} & (set(values) | set(file_values)):
        values["max_train_steps"] = 1  # the length of training does not matter for the cache
    cfg = build_config(file_values, values)
    images = open_cache(cfg.data, open_source(cfg.data))
    print(f"decode cache ready: {len(images)} images ({images.nbytes / 2**20:.1f} MB, {images.skipped} unreadable "
          f"skipped) in {images.folder}")


def _benchmark(args: argparse.Namespace) -> None:
    _check_scales(args, "peak_tflops")
    if args.suite == "gpu":
        from .experiments.gpu_check import format_gpu_table, run_gpu_check

        print(format_gpu_table(run_gpu_check(args)))
        if args.json:
            print(f"results written to {args.json}")
        return
    if args.dry_run:
        raise UserError("--dry_run belongs to --suite gpu")
    from .experiments.benchmark import format_table, run_benchmark

    results = run_benchmark(args)
    print(format_table(results))
    if args.json:
        print(f"results written to {args.json}")


DEFAULT_SAMPLERS = "ddpm=1000,ddim=50,dpmsolver++=20"


def _add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=("parts", "gpu"), default="parts",
                        help="parts: the --parts below; gpu: the fixed GPU check of docs/benchmarks.md (ddpm step "
                             "variants with MFU, adm largest batch, samplers in fp16/bf16, a 2-minute train run; its "
                             "sizes are its own, it takes --device, --peak_tflops, --work_dir, --json, --dry_run)")
    parser.add_argument("--dry_run", action="store_true",
                        help="--suite gpu at tiny sizes: seconds on a CPU (keeps the suite tested)")
    parser.add_argument("--train_data_dir", default=None,
                        help="folder of images (default: a generated folder of --image_size JPEGs)")
    parser.add_argument("--num_images", type=int, default=256, help="images to generate without --train_data_dir")
    parser.add_argument("--image_size", type=int, default=500, help="side of the generated JPEGs")
    parser.add_argument("--data_resolution", type=int, default=64, help="training resolution of the data benchmark")
    parser.add_argument("--model_preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=32, help="training and sampling resolution")
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps per mode (and compile)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating baseline/optimized rounds")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="decode threads of the stream path")
    parser.add_argument("--compile", action="store_true", help="torch.compile the optimized model")
    parser.add_argument("--mixed_precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                        help="optimized mode's precision (auto: timed at start as `train --mixed_precision auto` does)")
    parser.add_argument("--variants", default="auto",
                        help="variants part: comma-separated fp32|bf16|fp16[-nchw][+compile] (auto: the device's "
                             "precision candidates, channels-last and NCHW, and compiled with --compile)")
    parser.add_argument("--sample_batch_size", type=int, default=16)
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS, help="name=steps,... of the samplers to time")
    parser.add_argument("--parts", default="data,train,sample", help="which of data,train,variants,sample to run")
    parser.add_argument("--peak_tflops", type=float, default=None, help="bf16 peak of the GPU for MFU")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    parser.add_argument("--work_dir", default=None, help="where generated images and caches go (default: temp)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowers-ddpm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    settings_usage = "%(prog)s [--config FILE] [--SETTING VALUE ...]"

    train = sub.add_parser("train", usage=settings_usage,
                           help="train a DDPM (run under `accelerate launch` for several processes)")
    add_train_arguments(train)
    train.set_defaults(func=_train)

    train_classifier = sub.add_parser(
        "train-classifier", usage=settings_usage,
        help="train a noise-aware classifier for classifier guidance (same data, model preset and noise-schedule "
             "flags as train; run under `accelerate launch` for several processes)")
    add_train_arguments(train_classifier, TRAIN_SECTIONS + ("classifier",))
    train_classifier.set_defaults(func=_train_classifier)

    sample = sub.add_parser("sample", help="generate images from a pipeline folder or Hub id")
    sample.add_argument("--model", required=True, help="pipeline folder or Hub id")
    sample.add_argument("--num_images", type=int, default=16)
    sample.add_argument("--scheduler", choices=SAMPLE_SCHEDULERS, default=None,
                        help="sampler (default: ddim for DDPM-trained models, the best measured in docs/sampling.md; "
                             "edm-dpmsolver++ for EDM-trained ones. ddpm uses learned variances)")
    sample.add_argument("--steps", type=int, default=50, help="sampler steps")
    sample.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    sample.add_argument("--batch_size", type=int, default=16)
    sample.add_argument("--output", default="samples.png", help="grid PNG to write")
    sample.add_argument("--output_dir", default=None, help="also write each image as a PNG here")
    _add_conditioning_arguments(sample, without_labels="unconditional, through the 'no class' token")
    sample.add_argument("--classifier", default=None, metavar="DIR",
                        help="noise-aware classifier (the --output_dir of train-classifier) for classifier guidance "
                             "towards --class_labels; works for unconditional and class-conditional models (default: "
                             "the classifier the pipeline carries, if any)")
    sample.add_argument("--classifier_scale", type=float, default=None,
                        help="classifier guidance scale s (default: the pipeline's saved one, else 1; the paper uses "
                             "1-10; 0 turns off a saved classifier)")
    sample.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    sample.add_argument("--trust_remote_code", action="store_true",
                        help="run the Python code a pipeline ships (a custom pipeline or component class); read it "
                             "first. Without it such a pipeline is refused")
    sample.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sample.set_defaults(func=_sample)

    reconstruct = sub.add_parser("ema-reconstruct", help="post-hoc EMA (EDM2): export a pipeline for each EMA "
                                 "length, synthesised from the snapshots of a run trained with --phema_sigma_rel")
    reconstruct.add_argument("--run_dir", required=True, help="the training --output_dir")
    reconstruct.add_argument("--sigma_rel", type=float, nargs="+", required=True,
                             help="relative EMA widths to synthesise, e.g. 0.05 0.1 0.15")
    reconstruct.add_argument("--output_dir", help="where the pipelines go (default <run_dir>/ema-reconstruct); one "
                             "folder sigma_rel-<value> each")
    reconstruct.set_defaults(func=_ema_reconstruct)

    attach = sub.add_parser("attach-classifier", help="save a pipeline with a noise-aware classifier and default "
                                                      "guidance scales, loadable with only diffusers installed")
    _add_attach_classifier_arguments(attach)
    attach.set_defaults(func=_attach_classifier)

    evaluate = sub.add_parser("evaluate", help="FID, KID, IS, precision/recall and FD-DINOv2 of a pipeline "
                                               "(run under `accelerate launch` for several processes)")
    _add_evaluate_arguments(evaluate)
    evaluate.set_defaults(func=_evaluate)

    sweep = sub.add_parser("sweep", help="train and evaluate one short run per combination of a settings grid (or "
                                         "per trial of an Optuna search), and compare them in one table (resumable)")
    _add_sweep_arguments(sweep)
    sweep.set_defaults(func=_sweep)

    push = sub.add_parser("push", help="upload a pipeline folder with a model card to the Hugging Face Hub")
    push.add_argument("--model", required=True, help="pipeline folder (or a run's output_dir)")
    push.add_argument("--repo_id", required=True, help="user/name on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", default=None, help="branch to push to (created if missing; default: main)")
    push.add_argument("--commit_message", default=None)
    push.add_argument("--license", default="apache-2.0", help="license in the card's metadata")
    push.add_argument("--dry_run", action="store_true",
                      help="only stage the upload in --staging_dir (default: a new temporary folder) and list it")
    push.add_argument("--staging_dir", default=None, help="empty folder to stage the upload in")
    push.add_argument("--space_id", default=None, metavar="USER/NAME",
                      help="also push a Gradio Space serving the model (the `demo` page) and link it from the card")
    push.add_argument("--space_staging_dir", default=None,
                      help="empty folder to stage the Space in (default with --dry_run: <staging_dir>-space)")
    push.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    push.set_defaults(func=_push)

    demo = sub.add_parser("demo", help="a Gradio page that generates images from a pipeline folder or Hub id "
                                       "(needs the demo extra: pip install -e \".[demo]\")")
    _add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    prepare = sub.add_parser("prepare", usage=settings_usage,
                             help="build the decode-once cache for a training config (see --decode_cache)")
    add_train_arguments(prepare, ("data",), hidden=[name for name in TRAIN_SECTIONS if name != "data"])
    prepare.set_defaults(func=_prepare)

    benchmark = sub.add_parser("benchmark", help="measure data-path, training-step and sampling speed")
    _add_benchmark_arguments(benchmark)
    benchmark.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    benchmark.set_defaults(func=_benchmark)
    return parser


def _setup_logging() -> None:
    main = is_main_process()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("flowers_ddpm").setLevel(logging.INFO if main else logging.WARNING)


def _reject_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> None:
    """argparse names unknown flags with the top-level usage; name them with the subcommand's usage instead, and
    the nearest flag that exists."""
    sub = parser._subparsers._group_actions[0].choices[args.command]  # the subcommand's own parser
    known = [option for action in sub._actions for option in action.option_strings]
    hints = []
    for flag in (u for u in unknown if u.startswith("--")):
        close = difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.75)
        if close:
            hints.append(f"{flag.split('=')[0]}: did you mean {close[0]}?")
    sub.error(f"unrecognized arguments: {' '.join(unknown)}" + ("; " + "; ".join(hints) if hints else ""))


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of `flowers-ddpm`; returns the process exit code."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _reject_unknown(parser, args, unknown)
    debug = bool(getattr(args, "debug", False))
    try:
        _setup_logging()
        args.func(args)
    except (TrainingStopped, SignalStop) as e:  # preempted (75) or non-finite (3): see flowers_ddpm.training.stopping
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except (UserError, OSError) as e:  # OSError: any other write the disk refused (a sample grid, a report)
        problem = user_error_of(e)
        if problem is None or debug:
            raise
        if not problem.reported:  # one that all processes of a launch raise together was printed once already
            print(f"error: {problem}", file=sys.stderr)
        return problem.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
