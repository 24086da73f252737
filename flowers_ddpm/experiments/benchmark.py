"""`flowers-ddpm benchmark`: data path, training step and sampling speed, measured in one run on one machine.

* data: images/s of the streaming decode path vs the decode-once cache over the same JPEG folder.
* train: steady-state images/s of a `baseline` step (what diffusers' example does: fp32, contiguous NCHW batches,
  a full-size JPEG decode (no draft mode) + transform every step, PyTorch's default AdamW, EMA without foreach)
  and of the `optimized` step (decode cache, channels-last batches, fused AdamW, foreach EMA, bf16 autocast where
  the device has it, optional torch.compile), both through the real `Trainer.run_step`. The two modes run in
  alternating rounds so that load from other programs on a shared machine affects both alike.
* variants: seconds per bare training step (forward, backward, clipping, AdamW; no data path, no EMA) of the same
  model in each precision (fp32, bf16 autocast, fp16 autocast), channels-last on/off and torch.compile on/off, in
  alternating rounds: the timing loop of `--mixed_precision auto` (flowers_ddpm.training.precision), run longer.
* sample: images/s of DDPM, DDIM and DPM-Solver++ at a given batch.

It measures; it asserts nothing. Compile and warm-up steps are excluded from the timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used, so `--help` stays fast
    import torch

import platform

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ..config.loading import build_config
from ..config.sections import SAMPLE_SCHEDULERS
from ..data.cache import CachedBatches, build_cached_batches, open_cache
from ..data.imaging import TransformSettings
from ..data.stream import build_train_batches, open_source
from ..errors import UserError
from ..models.unet import build_noise_scheduler, build_unet, check_preset
from ..objectives.diffusion import DiffusionObjective
from ..pipelines.export import build_pipeline
from ..pipelines.sampling import generate, prepare_for_sampling
from ..training.device import DeviceBatches, configure_backends, prepare_model
from ..training.optimization import build_optimizer
from ..training.precision import PrecisionChoice, Variant, candidates, describe, resolve_mixed_precision, time_variants
from ..training.trainer import LoopSettings, Trainer

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (FLOP/s) of common accelerators, for model FLOPs utilisation.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12,
                   "H100": 756e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


# -- inputs ---------------------------------------------------------------------------------------------------
def generate_jpeg_folder(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` size x size JPEGs (smooth gradients plus noise, two class sub-folders) in `folder`."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for i in range(count):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        colour = rng.uniform(40, 215, 3).astype(np.float32)
        base = colour * (0.5 + ramp[:, None, None] * ramp[None, :, None])
        pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"c{i % 2}" / f"{i:05d}.jpg", quality=90)
    return folder


def _config(args, data_dir: str, work: Path, resolution: int, **overrides):
    values = dict(train_data_dir=data_dir, model_preset=args.model_preset, resolution=resolution, center_crop=True,
                  random_flip=True, train_batch_size=args.train_batch_size, max_train_steps=1,
                  shuffle_buffer_size=64, dataloader_num_workers=args.dataloader_num_workers,
                  decode_cache_dir=str(work / "caches"), logger="none", output_dir=str(work / "out"))
    values.update(overrides)
    cfg = build_config({}, values)
    check_preset(cfg.model, cfg.data.resolution)
    return cfg


def _take(batches, images: int) -> tuple[float, int]:
    """Seconds to draw at least `images` images from `batches`, and how many were drawn."""
    seen, start = 0, time.perf_counter()
    for batch in batches:
        seen += batch["pixel_values"].shape[0]
        if seen >= images:
            break
    return time.perf_counter() - start, seen


# -- data -----------------------------------------------------------------------------------------------------
def benchmark_data(args, data_dir: str, work: Path) -> dict:
    """Streaming decode vs decode-once cache over one folder at --data_resolution."""
    cfg = _config(args, data_dir, work, args.data_resolution)
    source = open_source(cfg.data)
    total = source.num_examples
    stream_s, stream_n = _take(build_train_batches(cfg.data, source, 0, 1, cfg.optim.train_batch_size, cfg.run.seed),
                               total)
    start = time.perf_counter()
    images = open_cache(cfg.data, source)
    build_s = time.perf_counter() - start
    cached = CachedBatches(images, TransformSettings(cfg.data.resolution, cfg.data.center_crop, cfg.data.random_flip),
                           cfg.optim.train_batch_size, cfg.run.seed)
    cache_s, cache_n = _take(cached, 5 * total)  # several epochs: one is too short to time
    stream_ips, cache_ips = stream_n / stream_s, cache_n / cache_s
    return {"images": total, "resolution": cfg.data.resolution, "stream_images_per_sec": stream_ips,
            "cache_images_per_sec": cache_ips, "cache_build_sec": build_s, "cache_mb": images.nbytes / 2**20,
            "speedup": cache_ips / stream_ips}


# -- train ----------------------------------------------------------------------------------------------------
class _NoPublisher:
    def sample_grid(self, model, step):
        return None

    def export(self, model, step, training_seconds):
        return None


def _trainer(accelerator, cfg, optimized: bool, device: torch.device):
    """A Trainer for one benchmark mode, built the way `flowers_ddpm.training.diffusion_run` builds it."""
    torch.manual_seed(cfg.run.seed)
    model = build_unet(cfg.model.model_preset, cfg.data.resolution)
    scheduler = build_noise_scheduler(cfg.model.ddpm_num_steps, cfg.model.ddpm_beta_schedule, cfg.model.prediction_type)
    optimizer = build_optimizer(model.parameters(), cfg.optim, fused=optimized)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    ema = EMAModel(model.parameters(), decay=cfg.ema.ema_max_decay, use_ema_warmup=True, foreach=optimized)
    ema.to(device)
    source = open_source(cfg.data)
    if optimized:
        model = prepare_model(model, compile=cfg.speed.compile)
        model, optimizer = accelerator.prepare(model, optimizer)  # bf16 autocast when the accelerator has it
        batches = build_cached_batches(cfg.data, source, 0, 1, cfg.optim.train_batch_size, cfg.run.seed)
    else:  # fp32, as diffusers' example with --mixed_precision no: not prepared, so no autocast
        model = model.to(device)
        # full-size decode, as diffusers does
        batches = build_train_batches(cfg.data, source, 0, 1, cfg.optim.train_batch_size, cfg.run.seed, jpeg_draft=False)
    batches = DeviceBatches(batches, device, channels_last=optimized)
    settings = LoopSettings(max_train_steps=10**9, output_dir=cfg.run.output_dir, logging_steps=10**9,
                            checkpointing_steps=10**9, save_images_steps=10**9)
    trainer = Trainer(accelerator, model, DiffusionObjective(scheduler), optimizer, lr_scheduler, ema, batches,
                      _NoPublisher(), settings)
    return trainer, iter(batches)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(trainer, batches, steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.run_step([next(batches)])
    _sync(device)
    return time.perf_counter() - start


def model_flops_per_image(trainer, batches) -> float:
    """Forward + backward FLOPs of one training micro-batch per image (torch.utils.flop_counter)."""
    batch = next(batches)
    with FlopCounterMode(display=False) as counter:
        loss = trainer.objective(trainer.model, batch)
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["pixel_values"].shape[0]


def peak_flops(device: torch.device, override_tflops: Optional[float]) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s (None on CPUs and unknown GPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS.items() if key in name), None)


def model_probe(preset: str, resolution: int):
    """A fresh UNet of the preset (unconditional, epsilon), its parameters and the plain diffusion objective."""
    def probe():
        model = build_unet(preset, resolution)
        return model, list(model.parameters()), DiffusionObjective(build_noise_scheduler(1000, "linear", "epsilon"))

    return probe


def optimized_precision(args, device: torch.device) -> PrecisionChoice:
    """The optimized mode's precision: as given, or `auto` measured as `train` measures it (and cached alike)."""
    choice = resolve_mixed_precision(args.mixed_precision, device, model_probe(args.model_preset, args.resolution),
                                     args.train_batch_size, args.resolution)
    logger.info("%s", describe(choice, f"{args.model_preset} at {args.resolution}px, batch {args.train_batch_size}"))
    return choice


def benchmark_train(args, data_dir: str, work: Path, device: torch.device) -> dict:
    """Baseline vs optimized training step, alternating rounds, steady state."""
    choice = optimized_precision(args, device)
    precision = choice.precision
    cfg = _config(args, data_dir, work, args.resolution, compile=args.compile)
    open_cache(cfg.data, open_source(cfg.data))  # built before timing; the data section times the build
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    modes = {}
    for name in ("baseline", "optimized"):
        configure_backends(allow_tf32=name == "optimized")
        trainer, batches = _trainer(accelerator, cfg, name == "optimized", device)
        modes[name] = {"trainer": trainer, "batches": batches, "seconds": 0.0, "peak": 0}
    flops = model_flops_per_image(modes["baseline"]["trainer"], modes["baseline"]["batches"])
    for name, mode in modes.items():  # warm-up (and compile) outside the timings
        configure_backends(allow_tf32=name == "optimized")
        start = time.perf_counter()
        _timed_steps(mode["trainer"], mode["batches"], args.warmup_steps, device)
        mode["warmup_sec"] = time.perf_counter() - start

    for _ in tqdm(range(args.rounds), desc="train rounds", dynamic_ncols=True):
        for name, mode in modes.items():
            configure_backends(allow_tf32=name == "optimized")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            mode["seconds"] += _timed_steps(mode["trainer"], mode["batches"], args.steps, device)
            if device.type == "cuda":
                mode["peak"] = max(mode["peak"], torch.cuda.max_memory_allocated(device))
    images = args.rounds * args.steps * cfg.optim.train_batch_size
    peak = peak_flops(device, args.peak_tflops)
    result = {"model_preset": cfg.model.model_preset, "resolution": cfg.data.resolution, "batch_size": cfg.optim.train_batch_size,
              "timed_steps_per_mode": args.rounds * args.steps, "model_gflops_per_image": flops / 1e9}
    for name, mode in modes.items():
        ips = images / mode["seconds"]
        result[name] = {
            "images_per_sec": ips, "warmup_sec": mode["warmup_sec"],
            "precision": precision if name == "optimized" else "no",
            "peak_memory_mb": mode["peak"] / 2**20 if device.type == "cuda" else None,
            "mfu": flops * ips / peak if peak else None,
        }
    result["speedup"] = result["optimized"]["images_per_sec"] / result["baseline"]["images_per_sec"]
    result["optimized"]["precision_choice"] = choice.record()
    return result


def parse_variants(text: str, device: torch.device, compile: bool) -> list[Variant]:
    """'fp32,bf16-nchw,...' -> Variants; 'auto': every precision candidate of the device, channels-last and NCHW
    (and each of those compiled too with `compile`)."""
    if text == "auto":
        variants = [Variant(p, layout) for p in candidates(device) for layout in (True, False)]
        return variants + ([Variant(v.precision, v.channels_last, True) for v in variants] if compile else [])
    try:
        variants = [Variant.parse(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError as e:
        raise UserError(f"--variants: {e}") from None
    if not variants or len({v.name for v in variants}) < len(variants):
        raise UserError(f"--variants must name distinct variants; got {text!r}")
    return variants


def benchmark_variants(args, device: torch.device) -> dict:
    """Bare training steps of one model in each variant, alternating rounds (warm-up and compilation untimed)."""
    variants = parse_variants(args.variants, device, args.compile)
    times = time_variants(model_probe(args.model_preset, args.resolution), variants, args.train_batch_size,
                          args.resolution, device, budget_s=None, rounds=args.rounds, steps_per_round=args.steps,
                          warmup_steps=args.warmup_steps)
    medians = times.median()
    result = {"model_preset": args.model_preset, "resolution": args.resolution, "batch_size": args.train_batch_size,
              "timed_steps_per_variant": times.rounds * args.steps}
    for variant in variants:
        seconds = medians[variant.name]
        result[variant.name] = {"images_per_sec": args.train_batch_size / seconds, "seconds_per_step": seconds,
                                "warmup_sec": times.warmup[variant.name]}
    return result


# -- sample ---------------------------------------------------------------------------------------------------
def parse_samplers(text: str) -> dict[str, int]:
    """'ddpm=1000,ddim=50' -> {'ddpm': 1000, 'ddim': 50}."""
    samplers = {}
    for item in filter(None, text.split(",")):
        name, _, steps = item.partition("=")
        if name not in SAMPLE_SCHEDULERS or not steps.isdigit() or int(steps) < 1:
            raise UserError(f"samplers must be name=steps with names from {', '.join(SAMPLE_SCHEDULERS)}; got {item!r}")
        samplers[name] = int(steps)
    return samplers


def benchmark_sample(args, device: torch.device, precision: Optional[str] = None) -> dict:
    """Images/s of each sampler on a freshly initialised UNet (speed does not depend on the weights). `precision`:
    fp16 (half weights, as `flowers-ddpm sample` on GPUs; the default there), bf16 (autocast over fp32 weights:
    the pipeline cannot turn bf16 images into PIL images) or fp32 (the default on CPUs)."""
    torch.manual_seed(0)
    precision = precision or ("fp16" if device.type == "cuda" else "fp32")
    unet = build_unet(args.model_preset, args.resolution)
    pipe = build_pipeline(unet, build_noise_scheduler(1000, "linear", "epsilon"))
    pipe = prepare_for_sampling(pipe.to(device, torch.float16) if precision == "fp16" else pipe.to(device))
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    batch = args.sample_batch_size
    with autocast:
        generate(pipe, batch, 1, seed=0, scheduler="ddim", batch_size=batch)  # warm-up
    result = {"batch_size": batch, "precision": {"fp16": "float16", "bf16": "bfloat16 autocast"}.get(precision,
                                                                                                    "float32")}
    for name, steps in tqdm(parse_samplers(args.samplers).items(), desc="samplers", dynamic_ncols=True):
        _sync(device)
        start = time.perf_counter()
        with autocast:
            generate(pipe, batch, steps, seed=0, scheduler=name, batch_size=batch)
        _sync(device)
        seconds = time.perf_counter() - start
        result[name] = {"steps": steps, "images_per_sec": batch / seconds, "seconds": seconds}
    return result


# -- the command ----------------------------------------------------------------------------------------------
def machine_description(device: torch.device) -> dict:
    """What the numbers were measured on, including the load from other programs."""
    info = {"device": str(device), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "load_average_start": list(os.getloadavg())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(results: dict) -> str:
    """The results as a short human-readable table."""
    lines = []
    if "data" in results:
        d = results["data"]
        lines.append(f"data   stream {d['stream_images_per_sec']:10.1f} img/s   cache {d['cache_images_per_sec']:10.1f}"
                     f" img/s   speedup {d['speedup']:6.1f}x   ({d['images']} images at {d['resolution']}px,"
                     f" cache built in {d['cache_build_sec']:.1f}s)")
    if "train" in results:
        t = results["train"]
        lines.append(f"train  baseline {t['baseline']['images_per_sec']:8.1f} img/s   optimized"
                     f" {t['optimized']['images_per_sec']:8.1f} img/s   speedup {t['speedup']:6.2f}x"
                     f"   ({t['model_preset']} {t['resolution']}px batch {t['batch_size']}, {t['model_gflops_per_image']:.2f} GFLOP/img)")
        if t["optimized"]["mfu"] is not None:
            lines.append(f"       MFU optimized {100 * t['optimized']['mfu']:.1f}%")
    if "variants" in results:
        v = results["variants"]
        first = next(name for name in v if isinstance(v[name], dict))
        for name, row in ((k, r) for k, r in v.items() if isinstance(r, dict)):
            lines.append(f"step   {name:20s} {row['images_per_sec']:8.1f} img/s   {row['images_per_sec'] / v[first]['images_per_sec']:5.2f}x"
                         f" {first}   ({v['model_preset']} {v['resolution']}px batch {v['batch_size']}, bare step)")
    if "sample" in results:
        s = results["sample"]
        for name in SAMPLE_SCHEDULERS:
            if name in s:
                lines.append(f"sample {name:12s} {s[name]['steps']:5d} steps {s[name]['images_per_sec']:10.2f} img/s"
                             f"   (batch {s['batch_size']}, {s['precision']})")
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Run the requested parts and return (and optionally write) the results."""
    parts = set(filter(None, args.parts.split(",")))
    if parts - {"data", "train", "variants", "sample"} or not parts:
        raise UserError(f"parts must be a comma-separated subset of data,train,variants,sample; got {args.parts!r}")
    if args.train_data_dir and not Path(args.train_data_dir).is_dir():
        raise UserError(f"train_data_dir {args.train_data_dir} does not exist or is not a directory")
    parse_samplers(args.samplers)  # fail on a bad --samplers before any work
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "variants" in parts:
        parse_variants(args.variants, device, args.compile)  # fail on a bad --variants before any work
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flowers-ddpm-bench-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        data_dir = args.train_data_dir or str(generate_jpeg_folder(work / "images", args.num_images, args.image_size))
        results = {"machine": machine_description(device)}
        if "data" in parts:
            results["data"] = benchmark_data(args, data_dir, work)
        if "train" in parts:
            results["train"] = benchmark_train(args, data_dir, work, device)
        if "variants" in parts:
            results["variants"] = benchmark_variants(args, device)
        if "sample" in parts:
            results["sample"] = benchmark_sample(args, device)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["machine"]["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results
