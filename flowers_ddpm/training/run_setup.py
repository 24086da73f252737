"""Run set-up shared by `train` and `train-classifier`: checks, the Accelerator, the data source and its batches,
the number of steps, the loop settings and trackers, and running the trainer."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from .._util.distributed import process_state, together
from ..config.sections import TrainConfig
from ..data.cache import build_cached_batches, open_cache
from ..data.stream import DataSource, build_train_batches, open_source
from ..errors import UserError
from ..models.unet import check_preset
from ..pipelines.conditioning import check_guidance_interval
from ..publish.hub import require_token
from . import checkpointing
from .device import DeviceBatches, set_cpu_threads
from .precision import (
    LAYOUT_SHARE,
    PROBE_BUDGET_S,
    PrecisionChoice,
    Probe,
    SettingChoice,
    describe,
    resolve_channels_last,
    resolve_compile,
    resolve_mixed_precision,
)
from .trainer import LoopSettings

logger = logging.getLogger(__name__)
DEFAULT_NUM_EPOCHS = 100  # diffusers' example default, when neither max_train_steps nor num_epochs is given


class RunStart(NamedTuple):
    accelerator: Accelerator
    source: DataSource
    class_names: Optional[list]
    max_steps: int
    resume_from: Optional[Path]
    steps_per_epoch: Optional[int]  # None for a stream of unknown size
    speed: "SpeedChoices"  # what --mixed_precision, --channels_last and --compile resolved to, and how


def steps_per_epoch(cfg: TrainConfig, num_examples: Optional[int], world_size: int) -> Optional[int]:
    """Optimizer steps per epoch counted as diffusers' train_unconditional.py counts them (None when the size is
    unknown): ceil(N / batch) batches, split over the processes (ceil), then ceil over gradient accumulation. Its
    last batch of an epoch is short; ours are always full (the stream runs on into the next epoch), so the step
    counts, the LR schedule and the *_epochs intervals match the example's exactly."""
    if num_examples is None:
        return None
    batches = math.ceil(math.ceil(num_examples / cfg.optim.train_batch_size) / world_size)
    return max(1, math.ceil(batches / cfg.optim.gradient_accumulation_steps))


def resolve_max_train_steps(cfg: TrainConfig, num_examples, world_size: int) -> int:
    """Optimizer steps to run: --max_train_steps, or --num_epochs (default 100, as diffusers' example) over a
    dataset of known size."""
    if cfg.optim.max_train_steps is not None:
        return cfg.optim.max_train_steps
    if num_examples is None:
        raise UserError("the dataset's size is unknown (a stream without metadata), so epochs cannot be counted; "
                        "set max_train_steps")
    return (cfg.optim.num_epochs or DEFAULT_NUM_EPOCHS) * steps_per_epoch(cfg, num_examples, world_size)


def _every(steps: Optional[int], epochs: Optional[int], per_epoch: Optional[int], name: str) -> Optional[int]:
    """An interval in optimizer steps from a step count or an epoch count (epochs win)."""
    if epochs is None:
        return steps
    if per_epoch is None:
        raise UserError(f"{name}_epochs needs a dataset of known size; use {name}_steps instead")
    return epochs * per_epoch


def check_environment(cfg: TrainConfig) -> None:
    """Cheap checks of what the run needs from the machine, before any work."""
    if cfg.run.logger == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError("logger wandb needs the wandb package: pip install 'flowers-ddpm[wandb]' (or use "
                        "--logger tensorboard)")
    if cfg.hub.hub_token is not None:
        if cfg.run.logger == "wandb":  # diffusers' examples refuse this combination for the same reason
            raise UserError("You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing "
                            "your token. Please use `hf auth login` to authenticate with the Hub.")
        logger.warning("--hub_token is visible in your shell history and process list; `hf auth login` (or HF_TOKEN) "
                       "is safer. It is used for the push only and written to no file.")


class SpeedChoices(NamedTuple):
    """What --mixed_precision, --channels_last and --compile resolved to, and how (training/precision.py)."""

    precision: PrecisionChoice
    channels_last: SettingChoice
    compile: SettingChoice
    cpu_threads: Optional[dict] = None  # CPU runs: {"setting", "used", "how"}

    def records(self, used_precision: Optional[str] = None) -> dict:
        """For training_info.json: each setting, what ran, how it was decided and the figures."""
        records = {"mixed_precision": self.precision.record(used_precision),
                   "channels_last": self.channels_last.record(), "compile": self.compile.record()}
        return {**records, "cpu_threads": self.cpu_threads} if self.cpu_threads else records


def resolve_speed(cfg: TrainConfig, probe: Probe, num_examples: Optional[int]) -> SpeedChoices:
    """--mixed_precision, --channels_last and --compile for this run, decided before the Accelerator exists (`auto`
    and unset values time the probe's model on the device accelerate will use; see training/precision.py). The
    run's settings are then the values that run, so training_config.yaml records them."""
    speed = cfg.speed
    timed = speed.mixed_precision == "auto" or speed.channels_last is None or speed.compile is None
    # the device accelerate will use (PartialState does not fix mixed precision; the Accelerator does)
    state = process_state()
    device = state.device if timed else None
    threads = None
    if state.device.type == "cpu":  # before anything is timed: the probe measures the threads that will run
        used, how = set_cpu_threads(speed.cpu_threads)
        threads = {"setting": "auto" if speed.cpu_threads is None else speed.cpu_threads, "used": used, "how": how}
        if how not in ("explicit", "default"):
            logger.info("cpu_threads auto -> %d (%s)", used, how)
    what = f"{cfg.model.model_preset} at {cfg.data.resolution}px, batch {cfg.optim.train_batch_size} on {device}"
    layout_timed = speed.channels_last is None and speed.mixed_precision == "auto"
    budget = PROBE_BUDGET_S * (1 - LAYOUT_SHARE) if layout_timed else PROBE_BUDGET_S
    precision = resolve_mixed_precision(speed.mixed_precision, device, probe, cfg.optim.train_batch_size,
                                        cfg.data.resolution, speed.channels_last is not False,
                                        speed.gradient_checkpointing, speed.allow_tf32, budget_s=budget)
    if precision.how not in ("explicit", "config"):
        logger.info("%s", describe(precision, what))
    layout = resolve_channels_last(speed.channels_last, device, probe, cfg.optim.train_batch_size,
                                   cfg.data.resolution, precision.precision, speed.gradient_checkpointing,
                                   speed.allow_tf32)
    eager = layout.figures.get("nchw_s" if layout.value is False else "channels_last_s")
    if eager is None and precision.seconds_per_step and layout.value:  # timed channels-last in `auto` above
        eager = precision.seconds_per_step.get(precision.precision)
    max_steps = resolve_max_train_steps(cfg, num_examples, state.num_processes) if speed.compile is None else 0
    compiled = resolve_compile(speed.compile, device, probe, cfg.optim.train_batch_size, cfg.data.resolution,
                               precision.precision, layout.value, max_steps, eager, speed.allow_tf32)
    for choice in (layout, compiled):
        if choice.how != "explicit":
            logger.info("%s", choice.describe(what))
    speed.channels_last, speed.compile = layout.value, compiled.value
    return SpeedChoices(precision, layout, compiled, threads)


def make_accelerator(cfg: TrainConfig, mixed_precision: Optional[str] = None):
    """The run's Accelerator; `mixed_precision` as resolved by `resolve_precision` (None: accelerate's config)."""
    project = ProjectConfiguration(project_dir=cfg.run.output_dir, logging_dir=str(Path(cfg.run.output_dir) / cfg.run.logging_dir))
    return Accelerator(
        gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=None if cfg.run.logger == "none" else cfg.run.logger,
        project_config=project,
    )


def effective_precision(accelerator) -> str:
    """The precision that runs: the accelerator's, except fp16 where accelerate has no fp16 autocast (the CPU)."""
    return "no" if accelerator.mixed_precision == "fp16" and not accelerator.native_amp else accelerator.mixed_precision


def record_effective_precision(cfg: TrainConfig, accelerator) -> None:
    """accelerate runs fp16 autocast only on accelerators: on the CPU --mixed_precision fp16 trains in fp32. Say so,
    and record what runs (mixed_precision: no) in training_config.yaml, the checkpoints and the exported config."""
    if effective_precision(accelerator) != accelerator.mixed_precision:
        if accelerator.is_main_process:
            logger.warning("mixed_precision fp16 is not available on the %s: training in fp32 (recorded as "
                           "mixed_precision: no); use bf16 for mixed precision on the CPU",
                           accelerator.device.type.upper())
        cfg.speed.mixed_precision = "no"


def _tracker_config(cfg: TrainConfig) -> dict:
    # TensorBoard hparams accept only scalars and strings
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()}


def _train_batches(cfg: TrainConfig, source, accelerator):
    """Batches from the decode-once cache (built first by one process per machine) or decoded from the stream."""
    if not cfg.data.decode_cache:
        return build_train_batches(cfg.data, source, accelerator.process_index, accelerator.num_processes,
                                   cfg.optim.train_batch_size, cfg.run.seed, cfg.run.log_data_order)

    with accelerator.local_main_process_first():
        if accelerator.is_local_main_process:
            open_cache(cfg.data, source)
    return build_cached_batches(cfg.data, source, accelerator.process_index, accelerator.num_processes,
                                cfg.optim.train_batch_size, cfg.run.seed, cfg.run.log_data_order)


def check_writable(output_dir: str) -> None:
    """Create the output dir and write (and remove) a file in it, so that a read-only mount, a file in its place or
    a path the system refuses is one line before any work, not a traceback at the first save."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"output_dir {output_dir} is a file, not a directory; choose another --output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"output_dir {output_dir} cannot be written ({e.strerror or e}); choose another "
                        "--output_dir") from None


def start_run(cfg: TrainConfig, classes_of, probe_of, select_source=None):
    """The checks and set-up every training command shares: resume checkpoint (checked for compatibility), the data
    source (`select_source(cfg, source)`, when given, returns the part to train on), its classes
    (`classes_of(cfg, source)`, which may raise a UserError), the mixed precision, layout and compile (`auto`/unset
    values time `probe_of(cfg, class_names)()`: the model, trainable parameters and objective the run will train), the
    Accelerator and the number of optimizer steps. `cfg` then records the mixed precision that actually runs (see
    `record_effective_precision`)."""
    # cheap checks first: nothing expensive happens before these pass
    check_preset(cfg.model, cfg.data.resolution, pretrained=cfg.finetune.init_from is not None)
    check_guidance_interval(cfg.run.sample_guidance_interval, "sample_guidance_interval")
    check_environment(cfg)
    check_writable(cfg.run.output_dir)
    resume_from = checkpointing.resolve_resume_path(cfg.run.output_dir, cfg.run.resume_from_checkpoint,
                                                    cfg.run.overwrite_output_dir)
    checkpointing.check_output_dir(cfg.run.output_dir, resume_from is not None, cfg.run.overwrite_output_dir)
    if resume_from is not None:
        checkpointing.check_compatible(resume_from, cfg.to_dict())
    if cfg.hub.push_to_hub:
        require_token(cfg.hub.hub_token)
    source = open_source(cfg.data)
    if select_source is not None:
        source = select_source(cfg, source)
    class_names = classes_of(cfg, source)
    speed = resolve_speed(cfg, probe_of(cfg, class_names), source.num_examples)
    accelerator = make_accelerator(cfg, speed.precision.precision)
    record_effective_precision(cfg, accelerator)
    if resume_from is None and cfg.run.overwrite_output_dir:
        with together(accelerator):
            if accelerator.is_main_process:
                checkpointing.remove_checkpoints(cfg.run.output_dir)
    max_steps = resolve_max_train_steps(cfg, source.num_examples, accelerator.num_processes)
    per_epoch = steps_per_epoch(cfg, source.num_examples, accelerator.num_processes)
    _every(None, cfg.run.save_images_epochs, per_epoch, "save_images")  # fail now, not at the end of set-up
    _every(None, cfg.run.save_model_epochs, per_epoch, "save_model")
    if accelerator.is_main_process:
        logger.info("training on %s (%s examples) for %d steps on %d process(es)", source.description,
                    source.num_examples or "unknown", max_steps, accelerator.num_processes)
        cfg.save_yaml(Path(cfg.run.output_dir) / "training_config.yaml")
        (Path(cfg.run.output_dir) / "report").mkdir(exist_ok=True)  # the trainer appends report/loss.jsonl
    return RunStart(accelerator, source, class_names, max_steps, resume_from, per_epoch, speed)


def loop_settings(cfg: TrainConfig, max_steps: int, per_epoch: Optional[int] = None):
    """The trainer's LoopSettings from the config (`per_epoch`: optimizer steps per epoch, for *_epochs)."""
    return LoopSettings(
        max_train_steps=max_steps, output_dir=cfg.run.output_dir, max_grad_norm=cfg.optim.max_grad_norm,
        logging_steps=cfg.run.logging_steps, checkpointing_steps=cfg.run.checkpointing_steps,
        checkpoints_total_limit=cfg.run.checkpoints_total_limit,
        save_images_steps=_every(cfg.run.save_images_steps, cfg.run.save_images_epochs, per_epoch, "save_images"),
        save_model_steps=_every(cfg.run.save_model_steps, cfg.run.save_model_epochs, per_epoch, "save_model"), log_data_order=cfg.run.log_data_order, eval_steps=cfg.eval.eval_steps,
        max_consecutive_nonfinite=cfg.run.max_consecutive_nonfinite, run_settings=cfg.to_dict(),
        phema_snapshot_steps=cfg.ema.phema_snapshot_steps,
    )


def init_trackers(cfg: TrainConfig, accelerator) -> None:
    """Start the experiment tracker (main process) with the run's settings."""
    if accelerator.is_main_process:
        accelerator.init_trackers(cfg.run.tracker_project_name, config=_tracker_config(cfg))


def device_batches(cfg: TrainConfig, source, accelerator):
    """This process's training batches on the accelerator's device."""
    return DeviceBatches(_train_batches(cfg, source, accelerator), accelerator.device, cfg.speed.channels_last)


def run_trainer(trainer, accelerator, resume_from, keep_process_group: bool = False) -> None:
    """Train (resuming from `resume_from` when given) and close the trackers whatever happens. `keep_process_group`
    leaves the distributed process group up for more work in this process (a sweep's next trial)."""
    try:
        trainer.train(resume_from)
    finally:
        if trainer.batches.skipped:
            logger.warning("process %d skipped %d unreadable images", accelerator.process_index,
                           trainer.batches.skipped)
        if keep_process_group:
            for tracker in accelerator.trackers:
                tracker.finish()
        else:
            accelerator.end_training()  # finishes the trackers and destroys the process group


def describe_hardware(accelerator) -> str:
    """E.g. '2 x NVIDIA H100 80GB HBM3' or '1 x CPU (x86_64)', for the model card."""
    device = accelerator.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type.upper()} ({platform.machine()})"
    return f"{accelerator.num_processes} x {name}"
