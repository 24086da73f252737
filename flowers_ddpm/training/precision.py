"""`--mixed_precision auto`: choose the precision of a run by timing a few real training steps of each numerically
safe candidate on this machine, for this model, resolution and batch, before the Accelerator is built (accelerate
fixes mixed precision when it is constructed).

Candidates: fp32 (`no`) always; bf16 autocast where the device has bf16 units (`bf16_supported`: GPUs with bf16,
CPUs with AVX512-BF16 or AMX); fp16 autocast with a gradient scaler on CUDA only. With a single candidate (e.g. a
CPU without bf16) nothing is timed. Otherwise each candidate runs forward, backward, gradient clipping and the AdamW
step of the run's own model on a random batch of the run's shape, in alternating rounds (so load from other
programs hits every candidate alike), within `PROBE_BUDGET_S`; when the full batch is too slow for that (a large
model on a CPU), a smaller batch is timed and scaled (`measure_candidates`). The choice is the safest candidate (fp32, then bf16,
then fp16) whose median step time is within `MARGIN` of the fastest: a mixed-precision mode must be at least 10%
faster to be used. The figures and the choice are cached per machine (CPU model and flags, or GPU name), PyTorch
version, thread count, model config, resolution, batch and layout under `cache_location("speed")`, so later runs
of the same kind start at once; delete that folder to measure again.

Under `accelerate launch` (or any launcher that starts several processes) `auto` takes the launcher's precision,
as `config` does: the processes could only agree on a measured choice after the process group exists, which is
after accelerate has fixed the precision.

The same timing loop, run longer and over more variants (channels-last on/off, torch.compile), gives the
benchmark's `variants` part.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

from .._util.atomic import atomic_write_text
from .._util.cache import cache_location, identity_key
from .device import bf16_supported, prepare_model

logger = logging.getLogger(__name__)

SAFETY_ORDER = ("no", "bf16", "fp16")  # fp32 first; bf16 keeps fp32's range; fp16 needs loss scaling
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# accelerate's values, plus "tf32": fp32 with TF32 matmuls and convolutions (GPUs from Ampere on; else plain fp32)
PRECISION_NAMES = {"no": "fp32", "tf32": "tf32", "bf16": "bf16", "fp16": "fp16"}
PROBE_BUDGET_S = 20.0  # wall-clock for the whole measurement, model building included
PROBE_MAX_ROUNDS = 5
MIN_TIMED_BATCH = 4  # measure_candidates times at least this many images per step
MARGIN = 1.10  # a mixed-precision candidate must be >= 10% faster than a safer one to be chosen
CACHE_VERSION = 1

# A probe builds what the run will train: (model, trainable parameters, objective); the objective turns
# (model, batch) into a loss, as in the trainer.
Probe = Callable[[], tuple]
# Seconds per step of each candidate, or None when no candidate could be timed within the budget.
Timer = Callable[[list], Optional[dict]]


def candidates(device: torch.device) -> list[str]:
    """The numerically safe precisions worth timing on `device`, safest first."""
    found = ["no"]
    if bf16_supported(device):
        found.append("bf16")
    if device.type == "cuda":
        found.append("fp16")
    return found


def choose(seconds_per_step: dict[str, float], margin: float = MARGIN) -> str:
    """The safest precision whose step time is within `margin` of the fastest one's."""
    fastest = min(seconds_per_step.values())
    return next(p for p in SAFETY_ORDER if p in seconds_per_step and seconds_per_step[p] <= fastest * margin)


# -- timing training steps ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One way of running the same training step: precision, memory layout of the batch, torch.compile. TF32 is
    off for `no` (strict fp32) and on for every other precision (as training's default --allow_tf32)."""

    precision: str = "no"
    channels_last: bool = True
    compile: bool = False

    @property
    def name(self) -> str:
        return (PRECISION_NAMES[self.precision] + ("" if self.channels_last else "-nchw")
                + ("+compile" if self.compile else ""))

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """'bf16', 'fp32-nchw', 'bf16+compile', 'fp16-nchw+compile' -> Variant."""
        rest, compiled = (text[: -len("+compile")], True) if text.endswith("+compile") else (text, False)
        rest, nchw = (rest[: -len("-nchw")], True) if rest.endswith("-nchw") else (rest, False)
        by_name = {name: key for key, name in PRECISION_NAMES.items()}
        if rest not in by_name:
            raise ValueError(f"unknown variant {text!r}: a precision ({', '.join(by_name)}), optionally followed by "
                             "-nchw and/or +compile")
        return cls(by_name[rest], not nchw, compiled)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(batch_size: int, resolution: int, device: torch.device, seed: int = 0) -> dict:
    """A training batch of the run's shape: pixels in [-1, 1], class labels 0 (valid for every class count)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1
    return {"pixel_values": pixels.to(device), "class_labels": torch.zeros(batch_size, dtype=torch.long, device=device)}


def step_function(model, parameters: list, objective, batch: dict, variant: Variant, device: torch.device):
    """One optimizer step of `model` as `variant` runs it (autocast like accelerate's, loss scaling for fp16);
    returns a callable that runs a step and waits for the device."""
    optimizer = torch.optim.AdamW(parameters, lr=1e-6, fused=device.type in ("cuda", "cpu"))
    dtype = AUTOCAST_DTYPES.get(variant.precision)
    scaler = torch.amp.GradScaler(device.type) if variant.precision == "fp16" else None
    layout = torch.channels_last if variant.channels_last else torch.contiguous_format
    micro = {**batch, "pixel_values": batch["pixel_values"].contiguous(memory_format=layout)}

    tf32 = variant.precision != "no"

    def step() -> None:
        if device.type == "cuda":  # a process-wide switch: set for each step, as variants alternate
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = objective(model, micro)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)

    return step


@dataclass
class StepTimes:
    """What `time_variants` measured: the warm-up step and each timed step of every variant, in seconds."""

    warmup: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)
    rounds: int = 0
    seconds: float = 0.0

    def median(self) -> Optional[dict]:
        """Median seconds per timed step of each variant; None when no round was timed (warm-up steps include
        one-time set-up, so they do not compare fairly)."""
        if not self.rounds:
            return None
        return {name: statistics.median(times) for name, times in self.steps.items()}


def time_variants(probe: Probe, variants: list[Variant], batch_size: int, resolution: int, device: torch.device,
                  budget_s: Optional[float] = PROBE_BUDGET_S, rounds: int = PROBE_MAX_ROUNDS, steps_per_round: int = 1,
                  warmup_steps: int = 1) -> StepTimes:
    """Time training steps of each variant on the probe's model: `warmup_steps` untimed steps each (kernel set-up,
    compilation), then up to `rounds` alternating rounds of `steps_per_round` steps each. With `budget_s`, a round
    starts only when it is expected to end within the budget (counted from the call, model building included);
    the warm-up stops at the first variant that ends past it."""
    start = time.perf_counter()
    times = StepTimes()
    models = {}  # one model per compile flag: variants that differ only in precision or layout share it
    batch = random_batch(batch_size, resolution, device)
    runners = {}
    for variant in variants:
        if variant.compile not in models:
            model, parameters, objective = probe()
            model = prepare_model(model.to(device).train(), compile=variant.compile)
            models[variant.compile] = (model, [p for p in parameters], objective)
        model, parameters, objective = models[variant.compile]
        runners[variant.name] = step_function(model, parameters, objective, batch, variant, device)
        times.warmup[variant.name], times.steps[variant.name] = None, []

    def over_budget(extra: float = 0.0) -> bool:
        return budget_s is not None and time.perf_counter() - start + extra > budget_s

    for name, run in runners.items():
        began = time.perf_counter()
        for _ in range(warmup_steps):
            run()
        times.warmup[name] = (time.perf_counter() - began) / max(warmup_steps, 1)
        if over_budget():
            break
    if all(t is not None for t in times.warmup.values()):
        for _ in range(rounds):
            expected = sum((statistics.median(s) if s else times.warmup[n]) for n, s in times.steps.items())
            if over_budget(expected * steps_per_round):
                break
            for name, run in runners.items():
                for _ in range(steps_per_round):
                    began = time.perf_counter()
                    run()
                    times.steps[name].append(time.perf_counter() - began)
            times.rounds += 1
    del runners, models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    times.seconds = time.perf_counter() - start
    return times


def measure_candidates(probe: Probe, names: list, batch_size: int, resolution: int, device: torch.device,
                       channels_last: bool = True, gradient_checkpointing: bool = False, allow_tf32: bool = True,
                       budget_s: float = PROBE_BUDGET_S) -> tuple[Optional[dict], int]:
    """Seconds per step of each precision in `names` at `batch_size` (None when not measurable within the
    budget), and the batch actually timed (see `measure_variants`)."""
    variants = {p: Variant(_computed_as(p, device, allow_tf32), channels_last) for p in names}
    return measure_variants(probe, variants, batch_size, resolution, device, gradient_checkpointing, budget_s)


def _computed_as(precision: str, device: torch.device, allow_tf32: bool = True) -> str:
    """The precision a run with `precision` computes in: fp32 is TF32 on CUDA with --allow_tf32; fp16 is fp32 on a
    CPU (accelerate has no fp16 autocast there)."""
    if precision == "fp16" and device.type != "cuda":
        return "no"
    return "tf32" if precision == "no" and allow_tf32 and device.type == "cuda" else precision


def measure_variants(probe: Probe, variants: dict, batch_size: int, resolution: int, device: torch.device,
                     gradient_checkpointing: bool = False, budget_s: float = PROBE_BUDGET_S
                     ) -> tuple[Optional[dict], int]:
    """Seconds per step of each of `variants` (key -> eager Variant) at `batch_size` (None when not measurable
    within the budget), and the batch actually timed.

    One step of a single image (first variant) first says how long a step takes: when a warm-up and a few steps of
    every variant at the full batch cannot fit in the budget (a large model on a CPU), a smaller batch that fits is
    timed and its figures are scaled to the full batch (a CPU's images/s hardly depends on the batch)."""
    start = time.perf_counter()
    names = list(variants)
    model, parameters, objective = probe()
    model = model.to(device).train()
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    single = step_function(model, list(parameters), objective, random_batch(1, resolution, device), variants[names[0]],
                           device)
    single()  # sets up kernels
    began = time.perf_counter()
    single()
    per_image = time.perf_counter() - began  # an overestimate of a large batch's: fixed costs per step included
    per_step = 0.75 * budget_s / (3 * len(names))  # a warm-up and two timed steps each, in 3/4 of the budget
    # never below MIN_TIMED_BATCH images: at batch 1 the per-step costs (bf16 casts of every weight) dominate
    timed_at = max(min(batch_size, MIN_TIMED_BATCH), min(batch_size, int(per_step / per_image)))
    times = time_variants(lambda: (model, parameters, objective), list(variants.values()), timed_at, resolution,
                          device, budget_s - (time.perf_counter() - start))
    median = times.median()
    if median is None:
        return None, timed_at
    return {p: median[v.name] * batch_size / timed_at for p, v in variants.items()}, timed_at


# -- the choice, cached ------------------------------------------------------------------------------------------
@dataclass
class PrecisionChoice:
    """What a run's `mixed_precision` setting resolved to, and how. `precision` is what the Accelerator gets (None:
    accelerate's config or launcher)."""

    setting: Optional[str]
    precision: Optional[str]
    how: str  # explicit | config | launcher | only candidate | measured | cached | not measurable
    seconds_per_step: dict = field(default_factory=dict)
    detail: str = ""

    def record(self, used: Optional[str] = None) -> dict:
        """For training_info.json: the setting, what ran (`used`: the accelerator's precision) and the figures."""
        info = {"setting": self.setting, "used": used or self.precision, "how": self.how}
        if self.seconds_per_step:
            info["seconds_per_step"] = {PRECISION_NAMES[p]: round(s, 4) for p, s in self.seconds_per_step.items()}
        return info


def machine_identity(device: torch.device) -> dict:
    """What decides kernel speed: the GPU's name, or the CPU's model and feature flags; PyTorch and its threads."""
    identity = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        identity["gpu"] = torch.cuda.get_device_name(device)
        identity["capability"] = list(torch.cuda.get_device_capability(device))
        return identity
    identity["cpu"], identity["flags"] = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                identity["cpu"] = value.strip()
            elif key.strip() in ("flags", "Features"):  # x86, ARM
                identity["flags"] = " ".join(sorted(value.split()))
                break
    except OSError:  # not Linux: the processor name is what there is
        pass
    identity["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return identity


def _model_identity(model, parameters) -> dict:
    config = {k: v for k, v in dict(getattr(model, "config", None) or {}).items()
              if not k.startswith("_")}  # diffusers' bookkeeping (e.g. _use_default_values, in set order)
    return {"class": type(model).__name__, "config": json.loads(json.dumps(config, default=str)),
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in parameters)}


def _launcher_precision() -> Optional[str]:
    """The precision `accelerate launch` set for the processes it started, or 'launcher' when some other launcher
    started several; None when this process was started directly."""
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "launcher"
    return None


def resolve_mixed_precision(setting: Optional[str], device: torch.device, probe: Probe, batch_size: int,
                            resolution: int, channels_last: bool = True, gradient_checkpointing: bool = False,
                            allow_tf32: bool = True, timer: Optional[Timer] = None, choices: Optional[list] = None,
                            cache_dir: Optional[Path] = None, budget_s: float = PROBE_BUDGET_S) -> PrecisionChoice:
    """Resolve `--mixed_precision` for a run: explicit values as given, `config`/None to accelerate's config,
    `auto` by measurement (see the module docstring). `timer` replaces the real timing of candidates (tests),
    `choices` the candidate list, `cache_dir` the cache folder."""
    if setting in ("no", "fp16", "bf16"):
        return PrecisionChoice(setting, setting, "explicit")
    if setting in (None, "config"):
        return PrecisionChoice(setting, None, "config")
    launched = _launcher_precision()
    if launched is not None:
        return PrecisionChoice(setting, None, "launcher", detail=f"the launcher's precision ({launched})")
    found = list(choices) if choices is not None else candidates(device)
    if len(found) == 1:
        return PrecisionChoice(setting, found[0], "only candidate",
                               detail=f"{PRECISION_NAMES[found[0]]} is the only candidate on {device.type}")
    built = [probe()]  # the model to time is built once, and also names the cache entry
    model, parameters, _ = built[0]
    identity = {"kind": "mixed_precision", "version": CACHE_VERSION, "machine": machine_identity(device),
                "model": _model_identity(model, list(parameters)), "resolution": resolution, "batch": batch_size,
                "channels_last": channels_last, "gradient_checkpointing": gradient_checkpointing, "candidates": found}
    del model, parameters
    path = _cache_file("mixed_precision", identity, cache_dir)
    cached = _load_record(path, identity)
    if cached is not None and cached.get("choice") in found:  # else a hand-edited file: measure again
        built.clear()
        scaled = (f"timed at batch {cached['timed_batch']} of {batch_size}, scaled; "
                  if cached.get("timed_batch", batch_size) != batch_size else "")
        return PrecisionChoice(setting, cached["choice"], "cached", cached["seconds_per_step"],
                               f"{scaled}measured {cached['measured_at']}, {path}")

    timed_at = batch_size
    if timer is None:
        def timer(names):
            nonlocal timed_at
            model = built.pop() if built else probe()
            seconds, timed_at = measure_candidates(lambda: model, names, batch_size, resolution, device, channels_last,
                                                   gradient_checkpointing, allow_tf32, budget_s)
            return seconds

    seconds = timer(found)
    built.clear()
    if not seconds:
        return PrecisionChoice(setting, "no", "not measurable",
                               detail=f"a warm-up and one timed step of each candidate take longer than the "
                                      f"{budget_s:.0f} s budget allows; fp32, the safe choice")
    choice = choose(seconds)
    scaled = f"timed at batch {timed_at} of {batch_size}, scaled; " if timed_at != batch_size else ""
    _save_record(path, {"identity": identity, "choice": choice, "seconds_per_step": seconds, "timed_batch": timed_at})
    return PrecisionChoice(setting, choice, "measured", seconds, f"{scaled}cached in {path}")


def describe(choice: PrecisionChoice, what: str) -> str:
    """One log line: the setting, what it resolved to, the figures and where they came from."""
    used = "accelerate's config" if choice.precision is None else PRECISION_NAMES[choice.precision]
    line = f"mixed_precision {choice.setting or 'unset'} -> {used} ({choice.how}"
    if choice.seconds_per_step:
        fp32 = choice.seconds_per_step.get("no")
        figures = ", ".join(f"{PRECISION_NAMES[p]} {1000 * s:.0f} ms/step"
                            + (f" ({fp32 / s:.2f}x)" if fp32 and p != "no" else "")
                            for p, s in choice.seconds_per_step.items())
        line += f" for {what}: {figures}"
    if choice.detail:
        line += f"; {choice.detail}"
    return line + ")"


# -- channels-last and torch.compile, decided the same way -------------------------------------------------------
LAYOUT_MARGIN = 1.05  # NCHW batches must be >= 5% faster than channels-last (the default) to be chosen
LAYOUT_SHARE = 0.35  # of the start-up budget, when the precision is timed as well
COMPILE_MIN_RUN_S = 1800.0  # compile is timed only for runs projected to take at least this long eager
COMPILE_PAYBACK = 2.0  # compile is chosen when the projected saving is at least this many times the compile time
COMPILE_ROUNDS = 3
# Times the candidates of one setting (eager Variants by key, or for compile the eager and compiled Variant);
# returns seconds per step by key (for compile also "compile": the compile time), or None when not measurable.
SettingTimer = Callable[[dict], Optional[dict]]


@dataclass
class SettingChoice:
    """What a boolean speed setting (`channels_last`, `compile`) resolved to; `setting` None is `auto` (unset)."""

    name: str
    setting: Optional[bool]
    value: bool
    how: str  # explicit | default | launcher | measured | cached | run too short | not measurable
    figures: dict = field(default_factory=dict)  # seconds per step (and compile seconds, projected steps)
    detail: str = ""

    def record(self) -> dict:
        """For training_info.json: the setting, what ran, how it was decided and the figures."""
        info = {"setting": "auto" if self.setting is None else self.setting, "used": self.value, "how": self.how}
        if self.figures:
            info["figures"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in self.figures.items()}
        return info

    def describe(self, what: str) -> str:
        """One log line, like `describe` for the precision."""
        line = f"{self.name} {'auto' if self.setting is None else self.setting} -> {self.value} ({self.how}"
        if self.figures:
            line += f" for {what}: " + ", ".join(_figure(k, v) for k, v in self.figures.items())
        if self.detail:
            line += f"; {self.detail}"
        return line + ")"


def _figure(key: str, value) -> str:
    """'nchw_s' -> 'nchw 90 ms/step'; 'compile_s' -> 'compile 61.2 s'; 'steps' -> 'steps 2000'."""
    if key in ("compile_s", "projected_saving_s"):
        return f"{key[:-2].replace('_', ' ')} {value:.1f} s"
    if key.endswith("_s"):
        return f"{key[:-2].replace('_', '-')} {1000 * value:.0f} ms/step"
    return f"{key} {value}"


def _cache_file(kind: str, identity: dict, cache_dir: Optional[Path]) -> Path:
    return Path(cache_dir or cache_location("speed", None)) / f"{kind}-{identity_key(identity)}.json"


def _load_record(path: Path, identity: dict) -> Optional[dict]:
    """The cached record of `identity`; None when absent, damaged or another identity's (a hash collision)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("identity") == identity else None


def _save_record(path: Path, record: dict) -> None:
    record = {**record, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    except OSError as e:  # a read-only cache is no reason to stop a run
        logger.warning("could not cache a speed choice in %s: %s", path, e)


def _identity(kind: str, device: torch.device, model, parameters, resolution: int, batch_size: int, **more) -> dict:
    return {"kind": kind, "version": CACHE_VERSION, "machine": machine_identity(device),
            "model": _model_identity(model, list(parameters)), "resolution": resolution, "batch": batch_size, **more}


def resolve_channels_last(setting: Optional[bool], device: torch.device, probe: Probe, batch_size: int,
                          resolution: int, precision: Optional[str], gradient_checkpointing: bool = False,
                          allow_tf32: bool = True, timer: Optional[SettingTimer] = None,
                          cache_dir: Optional[Path] = None, budget_s: float = PROBE_BUDGET_S * LAYOUT_SHARE
                          ) -> SettingChoice:
    """`--channels_last` for a run: as given, or unset (`auto`) by timing channels-last against NCHW batches in
    the run's precision (`precision`; None: accelerate's, which is not known yet, so channels-last). NCHW must be
    `LAYOUT_MARGIN` faster to be chosen. Cached like the precision."""
    name = "channels_last"
    if setting is not None:
        return SettingChoice(name, setting, setting, "explicit")
    if _launcher_precision() is not None:  # the processes could not agree on a timed choice before they start
        return SettingChoice(name, None, True, "launcher", detail="not timed under a launcher: channels-last")
    if precision is None:
        return SettingChoice(name, None, True, "default", detail="the precision is accelerate's config, not timed: "
                                                                 "channels-last")
    built = probe()  # the model to time, which also names the cache entry
    computed = _computed_as(precision, device, allow_tf32)
    identity = _identity(name, device, built[0], built[1], resolution, batch_size, precision=computed,
                         gradient_checkpointing=gradient_checkpointing)
    path = _cache_file(name, identity, cache_dir)
    cached = _load_record(path, identity)
    if cached is not None and isinstance(cached.get("choice"), bool):
        return SettingChoice(name, None, cached["choice"], "cached", cached["figures"], f"measured "
                             f"{cached['measured_at']}, {path}")
    candidates_ = {"channels_last_s": Variant(computed, True), "nchw_s": Variant(computed, False)}
    if timer is None:
        def timer(variants):
            return measure_variants(lambda: built, variants, batch_size, resolution, device,
                                    gradient_checkpointing, budget_s)[0]
    seconds = timer(candidates_)
    built = None  # frees the model before training builds its own
    if not seconds:
        return SettingChoice(name, None, True, "not measurable", detail=f"a warm-up and a step of each layout take "
                                                                        f"longer than {budget_s:.0f} s; channels-last")
    value = not seconds["nchw_s"] * LAYOUT_MARGIN <= seconds["channels_last_s"]
    _save_record(path, {"identity": identity, "choice": value, "figures": seconds})
    return SettingChoice(name, None, value, "measured", seconds, f"cached in {path}")


def measure_compile(probe: Probe, variants: dict, batch_size: int, resolution: int, device: torch.device,
                    rounds: int = COMPILE_ROUNDS) -> Optional[dict]:
    """Seconds per step of the eager and the compiled variant (fresh models: compile works in place), and the
    compile time (the compiled variant's warm-up step less the eager one's)."""
    times = time_variants(probe, list(variants.values()), batch_size, resolution, device, budget_s=None,
                          rounds=rounds, warmup_steps=1)
    median = times.median()
    if median is None:
        return None
    eager, compiled = variants["eager_s"].name, variants["compiled_s"].name
    return {"eager_s": median[eager], "compiled_s": median[compiled],
            "compile_s": max(times.warmup[compiled] - times.warmup[eager], 0.0)}


def resolve_compile(setting: Optional[bool], device: torch.device, probe: Probe, batch_size: int, resolution: int,
                    precision: Optional[str], channels_last: bool, max_steps: int,
                    eager_seconds: Optional[float] = None, allow_tf32: bool = True,
                    timer: Optional[SettingTimer] = None, cache_dir: Optional[Path] = None) -> SettingChoice:
    """`--compile` for a run: as given, or unset (`auto`): compiled only when the run is long enough to pay for
    the compilation. A run projected (max_steps x the eager step time, `eager_seconds` when already measured) to
    take under `COMPILE_MIN_RUN_S` eager is not compiled and nothing more is timed (compiling takes about a minute
    on a CPU); a longer one times compilation and the compiled step once (cached) and compiles when the projected
    saving, max_steps x (eager - compiled), is at least `COMPILE_PAYBACK` x the compile time."""
    name = "compile"
    if setting is not None:
        return SettingChoice(name, setting, setting, "explicit")
    if _launcher_precision() is not None:
        return SettingChoice(name, None, False, "launcher", detail="not timed under a launcher: eager")
    if precision is None:
        return SettingChoice(name, None, False, "default", detail="the precision is accelerate's config, not timed: "
                                                                  "eager")
    computed = _computed_as(precision, device, allow_tf32)
    eager = Variant(computed, channels_last)
    if eager_seconds is None:
        measured = measure_variants(probe, {"eager_s": eager}, batch_size, resolution, device,
                                    budget_s=PROBE_BUDGET_S * LAYOUT_SHARE)[0]
        if not measured:
            return SettingChoice(name, None, False, "not measurable", detail="an eager step does not fit the "
                                                                             "start-up budget; eager")
        eager_seconds = measured["eager_s"]
    projected = max_steps * eager_seconds
    if projected < COMPILE_MIN_RUN_S:
        return SettingChoice(name, None, False, "run too short", {"eager_s": eager_seconds, "steps": max_steps},
                             f"{max_steps} steps take about {projected / 60:.0f} min eager; compile is timed only "
                             f"for runs of {COMPILE_MIN_RUN_S / 60:.0f} min or more")
    model, parameters, _ = probe()
    identity = _identity(name, device, model, parameters, resolution, batch_size, precision=computed,
                         channels_last=channels_last)
    del model, parameters
    path = _cache_file(name, identity, cache_dir)
    cached = _load_record(path, identity)
    how = "cached"
    if cached is not None and isinstance(cached.get("figures"), dict):
        figures = cached["figures"]
    else:
        variants = {"eager_s": eager, "compiled_s": Variant(computed, channels_last, compile=True)}
        figures = (timer or (lambda v: measure_compile(probe, v, batch_size, resolution, device)))(variants)
        if not figures:
            return SettingChoice(name, None, False, "not measurable", detail="eager")
        _save_record(path, {"identity": identity, "figures": figures})
        how = "measured"
    saving = max_steps * (figures["eager_s"] - figures["compiled_s"])
    value = saving >= COMPILE_PAYBACK * figures["compile_s"]
    return SettingChoice(name, None, value, how, {**figures, "steps": max_steps, "projected_saving_s": saving},
                         f"compiled when the saving is >= {COMPILE_PAYBACK:g}x the compile time; {path}")
