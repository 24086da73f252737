"""`flowers-ddpm benchmark --suite gpu` (and `scripts/gpu_check.sh`): the GPU measurements of issue 18 in one call,
one table and one JSON, sized to finish in a few minutes on one H100/H200.

1. `step`: the `ddpm` preset (114M parameters) at 64x64, batch 128: bare training steps (forward, backward,
   clipping, AdamW) in fp32, TF32, bf16 autocast with NCHW and with channels-last batches, and bf16 + torch.compile,
   in alternating rounds (flowers_ddpm.training.precision's timing loop); images/s and model FLOPs utilisation
   (FLOPs of one forward + backward from torch.utils.flop_counter x images/s / the device's dense bf16 peak).
2. `adm`: the `adm` preset at 64x64, class-conditional with learned variances (the hybrid loss): images/s and peak
   memory at doubling batches up to the largest that fits.
3. `sample`: images/s of DDPM-1000, DDIM-50 and DPM-Solver++-20 in fp16 (half weights) and bf16 (autocast) (fp32
   on a CPU).
4. `train`: a real `flowers-ddpm train` run (a subprocess, decode cache on, `--mixed_precision auto`) on a
   generated 64x64 JPEG folder for about two minutes; its logged images/s against the bare step's, to show whether
   the data path and the loop keep up.

`--dry_run` runs every part at tiny sizes (the `tiny` preset at 16x16, a few steps; no compile; the train run in
fp32) in seconds on a quiet CPU, so a test keeps the suite from rotting. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.unet import build_noise_scheduler, build_unet
from ..objectives.diffusion import DiffusionObjective
from ..publish.run_log import read_records
from ..training.device import bf16_supported
from ..training.precision import Variant, random_batch, time_variants
from .benchmark import benchmark_sample, generate_jpeg_folder, machine_description, peak_flops


@dataclass(frozen=True)
class Plan:
    """The sizes of one gpu-check run."""

    preset: str = "ddpm"
    resolution: int = 64
    batch: int = 128
    variants: tuple = ("fp32", "tf32", "bf16-nchw", "bf16", "bf16+compile")
    warmup_steps: int = 3
    rounds: int = 3
    steps: int = 10
    adm_preset: str = "adm"
    adm_classes: int = 102
    adm_batches: tuple = (64, 128, 256, 512, 1024, 2048)
    adm_steps: int = 5
    adm_seconds: float = 90.0  # no larger batch is tried once the tries took this long
    sample_batch: int = 64
    samplers: str = "ddpm=1000,ddim=50,dpmsolver++=20"
    train_seconds: float = 120.0
    train_min_steps: int = 50
    train_images: int = 1024
    image_size: int = 80
    train_precision: str = "auto"  # the train run also shows what auto picks on the GPU


FULL = Plan()
DRY_RUN = Plan(preset="tiny", resolution=16, batch=4, variants=("fp32", "tf32", "bf16-nchw", "bf16"), warmup_steps=1,
               rounds=1, steps=1, adm_preset="tiny", adm_classes=3, adm_batches=(2, 4), adm_steps=1, adm_seconds=30,
               sample_batch=2, samplers="ddpm=2,ddim=2,dpmsolver++=2", train_seconds=0.0, train_min_steps=4,
               train_images=12, image_size=24, train_precision="no")


def _mixed(device: torch.device) -> str:
    return "bf16" if bf16_supported(device) else "no"


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def flops_per_image(model, objective, batch: dict) -> float:
    """Forward + backward FLOPs of one training step per image (torch.utils.flop_counter)."""
    with FlopCounterMode(display=False) as counter:
        objective(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["pixel_values"].shape[0]


def check_steps(plan: Plan, device: torch.device, peak: Optional[float]) -> dict:
    """Part 1: the preset's bare training step in each variant."""
    def probe():
        model = build_unet(plan.preset, plan.resolution)
        return model, list(model.parameters()), DiffusionObjective(build_noise_scheduler(1000, "linear", "epsilon"))

    model, _, objective = probe()
    flops = flops_per_image(model.to(device), objective, random_batch(2, plan.resolution, device))
    del model
    variants = [Variant.parse(name) for name in plan.variants]
    times = time_variants(probe, variants, plan.batch, plan.resolution, device, budget_s=None, rounds=plan.rounds,
                          steps_per_round=plan.steps, warmup_steps=plan.warmup_steps)
    _release(device)
    result = {"preset": plan.preset, "resolution": plan.resolution, "batch_size": plan.batch,
              "model_gflops_per_image": flops / 1e9, "timed_steps_per_variant": times.rounds * plan.steps}
    for variant in variants:
        seconds = times.median()[variant.name]
        ips = plan.batch / seconds
        result[variant.name] = {"images_per_sec": ips, "seconds_per_step": seconds,
                                "warmup_sec": times.warmup[variant.name], "mfu": flops * ips / peak if peak else None}
    return result


def check_adm(plan: Plan, device: torch.device) -> dict:
    """Part 2: the class-conditional, learned-sigma preset at doubling batches until one does not fit."""
    torch.manual_seed(0)
    scheduler = build_noise_scheduler(1000, "linear", "epsilon", learn_sigma=True)
    model = build_unet(plan.adm_preset, plan.resolution, num_classes=plan.adm_classes, learn_sigma=True).to(device)
    objective = DiffusionObjective(scheduler, learn_sigma=True, num_classes=plan.adm_classes, class_dropout_prob=0.1)
    built = (model, list(model.parameters()), objective)
    precision = _mixed(device)
    result = {"preset": plan.adm_preset, "resolution": plan.resolution, "class_conditional": True,
              "learn_sigma": True, "precision": precision, "batches": {}, "out_of_memory_at": None}
    started = time.perf_counter()
    for batch in plan.adm_batches:
        if time.perf_counter() - started > plan.adm_seconds:
            break
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            times = time_variants(lambda built=built: built, [Variant(precision)], batch, plan.resolution, device,
                                  budget_s=None, rounds=1, steps_per_round=plan.adm_steps, warmup_steps=1)
        except torch.cuda.OutOfMemoryError:
            result["out_of_memory_at"] = batch
            model.zero_grad(set_to_none=True)
            _release(device)
            break
        seconds = times.median()[Variant(precision).name]
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        result["batches"][str(batch)] = {"images_per_sec": batch / seconds, "peak_memory_mb": peak_mb}
    del built, model
    _release(device)
    if result["batches"]:
        largest = max(result["batches"], key=int)
        result["largest_batch"] = int(largest)
        result.update(result["batches"][largest])
    return result


def check_sampling(plan: Plan, device: torch.device) -> dict:
    """Part 3: each sampler in each half precision of the device (fp32 on a CPU)."""
    dtypes = ["fp16", "bf16"] if device.type == "cuda" else ["fp32"]
    result = {}
    for dtype in dtypes:
        args = argparse.Namespace(model_preset=plan.preset, resolution=plan.resolution,
                                  sample_batch_size=plan.sample_batch, samplers=plan.samplers)
        result[dtype] = benchmark_sample(args, device, dtype)
        _release(device)
    return result


def check_training(plan: Plan, device: torch.device, work: Path, step_seconds: float, bare_ips: dict) -> dict:
    """Part 4: `flowers-ddpm train` on a generated folder for about `plan.train_seconds`; its logged images/s
    (after the first logging interval) against the bare step of the precision it ran in."""
    folder = generate_jpeg_folder(work / "train-images", plan.train_images, plan.image_size)
    steps = max(plan.train_min_steps, int(plan.train_seconds / max(step_seconds, 1e-6)))
    logging_steps = max(1, steps // 20)
    out = work / "train-run"
    command = [sys.executable, "-m", "flowers_ddpm", "train", "--model_preset", plan.preset, "--resolution",
               str(plan.resolution), "--train_data_dir", str(folder), "--decode_cache", "--decode_cache_dir",
               str(work / "decoded"), "--center_crop", "--random_flip", "--train_batch_size", str(plan.batch),
               "--max_train_steps", str(steps), "--logging_steps", str(logging_steps), "--checkpointing_steps",
               str(steps), "--save_images_steps", str(steps), "--eval_batch_size", "4",
               "--ddpm_num_inference_steps", "5", "--logger", "none", "--mixed_precision", plan.train_precision,
               "--channels_last", "--no-compile", "--output_dir", str(out)]  # the layout of the bare steps, eager
    env = dict(os.environ)
    if device.type == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    result = {"command": " ".join(command[1:]), "steps": steps, "seconds": seconds, "returncode": run.returncode}
    if run.returncode != 0:
        result["error"] = run.stderr[-2000:]
        return result
    records = read_records(out)
    steady = [r["images_per_sec"] for r in records[1:]] or [r["images_per_sec"] for r in records]
    info = json.loads((out / "pipeline" / "training_info.json").read_text())
    used = info.get("mixed_precision", {}).get("used", "no")
    bare_name = {"no": "tf32" if device.type == "cuda" else "fp32", "bf16": "bf16", "fp16": "fp16"}.get(used)
    ips = sorted(steady)[len(steady) // 2]
    result.update(images_per_sec=ips, mixed_precision=info.get("mixed_precision"), bare_step_variant=bare_name,
                  bare_step_images_per_sec=bare_ips.get(bare_name),
                  ratio_to_bare_step=ips / bare_ips[bare_name] if bare_ips.get(bare_name) else None)
    return result


def run_gpu_check(args) -> dict:
    """Every part in order; returns the results (also written to --json)."""
    plan = DRY_RUN if args.dry_run else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peak = peak_flops(device, args.peak_tflops)
    work = Path(args.work_dir or "gpu-check-work")
    work.mkdir(parents=True, exist_ok=True)
    results = {"suite": "gpu", "dry_run": bool(args.dry_run), "plan": asdict(plan), "machine": machine_description(device),
               "peak_tflops": peak / 1e12 if peak else None, "part_seconds": {}}
    started = time.perf_counter()
    results["step"] = check_steps(plan, device, peak)
    results["part_seconds"]["step"] = time.perf_counter() - started
    for name, part in (("adm", lambda: check_adm(plan, device)), ("sample", lambda: check_sampling(plan, device))):
        began = time.perf_counter()
        results[name] = part()
        results["part_seconds"][name] = time.perf_counter() - began
    bare = {name: row["images_per_sec"] for name, row in results["step"].items() if isinstance(row, dict)}
    mixed = _mixed(device)
    began = time.perf_counter()
    results["train"] = check_training(plan, device, work, results["step"][mixed if mixed != "no" else "fp32"]
                                      ["seconds_per_step"], bare)
    results["part_seconds"]["train"] = time.perf_counter() - began
    results["seconds"] = time.perf_counter() - started
    results["machine"]["load_average_end"] = list(os.getloadavg())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def format_gpu_table(results: dict) -> str:
    """The one table the suite prints."""
    machine, step = results["machine"], results["step"]
    device = machine.get("gpu") or machine["device"]
    peak = f", dense bf16 peak {results['peak_tflops']:.0f} TFLOP/s" if results["peak_tflops"] else ""
    lines = [f"gpu check{' (dry run)' if results['dry_run'] else ''} on {device}, torch {machine['torch']}{peak}",
             "| part | setting | images/s | MFU / peak memory | note |", "| --- | --- | --- | --- | --- |"]
    for name, row in step.items():
        if isinstance(row, dict):
            mfu = f"{100 * row['mfu']:.1f}% MFU" if row["mfu"] is not None else ""
            lines.append(f"| step | {step['preset']} {step['resolution']}px batch {step['batch_size']} {name} | "
                         f"{row['images_per_sec']:.1f} | {mfu} | warm-up {row['warmup_sec']:.1f} s/step |")
    adm = results["adm"]
    for batch, row in adm["batches"].items():
        memory = f"{row['peak_memory_mb'] / 1024:.1f} GiB" if row["peak_memory_mb"] is not None else ""
        note = "largest that fit" if int(batch) == adm.get("largest_batch") else ""
        if note and adm["out_of_memory_at"]:
            note += f" (out of memory at {adm['out_of_memory_at']})"
        lines.append(f"| adm | {adm['preset']} {adm['resolution']}px class-cond. learned sigma {adm['precision']} "
                     f"batch {batch} | {row['images_per_sec']:.1f} | {memory} | {note} |")
    for dtype, sample in results["sample"].items():
        for name in ("ddpm", "ddim", "dpmsolver++"):
            if name in sample:
                lines.append(f"| sample | {name}-{sample[name]['steps']} {dtype} batch {sample['batch_size']} | "
                             f"{sample[name]['images_per_sec']:.2f} | | |")
    train = results["train"]
    if train["returncode"] != 0:
        lines.append(f"| train | flowers-ddpm train | failed (exit {train['returncode']}) | | see the JSON |")
    else:
        precision = train["mixed_precision"] or {}
        used = f"{precision.get('setting')} -> {precision.get('used')}"
        ratio = (f"{train['ratio_to_bare_step']:.2f}x the bare {train['bare_step_variant']} step"
                 if train["ratio_to_bare_step"] else "")
        lines.append(f"| train | flowers-ddpm train, decode cache, {used}, {train['steps']} steps | "
                     f"{train['images_per_sec']:.1f} | | {ratio}; {train['seconds']:.0f} s |")
    lines.append(f"total {results['seconds']:.0f} s")
    return "\n".join(lines)
