"""The `train` command: assemble config -> data -> model -> objective -> trainer -> export, then run it."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import yaml

from . import checkpointing
from .config import TrainConfig
from .errors import UserError

logger = logging.getLogger(__name__)


class PipelinePublisher:
    """Sample grids (PNG under <output_dir>/samples/) and pipeline exports (<output_dir>/pipeline/)."""

    def __init__(self, cfg: TrainConfig, noise_scheduler, hardware: str = "unknown"):
        self.cfg, self.noise_scheduler = cfg, noise_scheduler
        self.output_dir = Path(cfg.output_dir)
        self.hardware, self.started = hardware, time.time()

    def sample_grid(self, model, step: int):
        from .finetune import sampling_unet
        from .pipeline import build_pipeline, generate, image_grid

        pipe = build_pipeline(sampling_unet(model), self.noise_scheduler)
        pipe.set_progress_bar_config(disable=True)
        was_training = model.training
        model.eval()
        images = generate(pipe, self.cfg.eval_batch_size, self.cfg.ddpm_num_inference_steps, seed=self.cfg.seed,
                          scheduler=self.cfg.sample_scheduler, batch_size=self.cfg.eval_batch_size)
        model.train(was_training)
        grid = image_grid(images)
        path = self.output_dir / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return grid

    def export(self, model, step: int) -> None:
        from .finetune import ADAPTER_DIR, merged_unet, save_adapter
        from .pipeline import export_pipeline
        from .report import write_training_info

        def write_extra(folder: Path) -> None:
            save_adapter(model, folder / ADAPTER_DIR, base_model=self.cfg.init_from)  # only for LoRA
            write_training_info(folder, step=step, seconds=time.time() - self.started, hardware=self.hardware)

        path = export_pipeline(merged_unet(model), self.noise_scheduler, self.output_dir / "pipeline",
                               yaml.safe_dump(self.cfg.to_dict(), sort_keys=False), write_extra)
        logger.info("exported pipeline at step %d to %s", step, path)


def resolve_max_train_steps(cfg: TrainConfig, num_examples, world_size: int) -> int:
    """Optimizer steps to run: --max_train_steps, or --num_epochs over a dataset of known size."""
    if cfg.max_train_steps is not None:
        return cfg.max_train_steps
    if num_examples is None:
        raise UserError("num_epochs needs a dataset of known size; set max_train_steps instead")
    per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * world_size
    return max(1, math.ceil(cfg.num_epochs * num_examples / per_step))


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / cfg.logging_dir))
    return Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.logger == "none" else cfg.logger,
        project_config=project,
    )


def _tracker_config(cfg: TrainConfig) -> dict:
    # TensorBoard hparams accept only scalars and strings
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()}


def run_training(cfg: TrainConfig) -> Path:
    """Train as configured and return the exported pipeline folder."""
    import torch
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from .data import build_train_batches, open_source
    from .finetune import load_for_finetuning, select_trainable, trainable_parameters
    from .models import build_noise_scheduler, build_unet
    from .objectives import DiffusionObjective
    from .trainer import LoopSettings, Trainer

    # cheap checks first: nothing expensive happens before these pass
    resume_from = checkpointing.resolve_resume_path(cfg.output_dir, cfg.resume_from_checkpoint)
    if cfg.push_to_hub:
        from .hub import require_token

        require_token()
    accelerator = make_accelerator(cfg)
    source = open_source(cfg)
    max_steps = resolve_max_train_steps(cfg, source.num_examples, accelerator.num_processes)
    if accelerator.is_main_process:
        logger.info("training on %s (%s examples) for %d steps on %d process(es)", source.description,
                    source.num_examples or "unknown", max_steps, accelerator.num_processes)
        cfg.save_yaml(Path(cfg.output_dir) / "training_config.yaml")
        (Path(cfg.output_dir) / "report").mkdir(exist_ok=True)  # the trainer appends report/loss.jsonl

    set_seed(cfg.seed)  # identical initial weights on every process
    if cfg.init_from:
        model, noise_scheduler = load_for_finetuning(cfg)
    else:
        model = build_unet(cfg.model_preset, cfg.resolution, cfg.unet_config)
        noise_scheduler = build_noise_scheduler(cfg.ddpm_num_steps, cfg.ddpm_beta_schedule, cfg.prediction_type)
    model = select_trainable(model, cfg)  # everything, --train_only parts, or LoRA adapters
    set_seed(cfg.seed, device_specific=True)  # different noise and timesteps on each process
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                                  eps=cfg.adam_epsilon)
    # Not passed to accelerator.prepare: prepared schedulers step once per process per call, which makes the
    # schedule depend on the number of processes. We step it once per optimizer step instead.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps)
    ema = None
    if cfg.use_ema:
        ema = EMAModel(model.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True, inv_gamma=cfg.ema_inv_gamma,
                       power=cfg.ema_power, model_cls=type(model), model_config=model.config, foreach=True)
        ema.to(accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = build_train_batches(cfg, source, accelerator.process_index, accelerator.num_processes)
    if accelerator.is_main_process:
        accelerator.init_trackers(cfg.tracker_project_name, config=_tracker_config(cfg))

    settings = LoopSettings(
        max_train_steps=max_steps, output_dir=cfg.output_dir, max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps, checkpointing_steps=cfg.checkpointing_steps,
        checkpoints_total_limit=cfg.checkpoints_total_limit, save_images_steps=cfg.save_images_steps,
        save_model_steps=cfg.save_model_steps, log_data_order=cfg.log_data_order,
    )
    trainer = Trainer(accelerator, model, DiffusionObjective(noise_scheduler), optimizer, lr_scheduler, ema, batches,
                      PipelinePublisher(cfg, noise_scheduler, describe_hardware(accelerator)), settings)
    trainer.train(resume_from)
    if batches.skipped and accelerator.is_main_process:
        logger.warning("skipped %d unreadable images", batches.skipped)
    accelerator.end_training()
    if accelerator.is_main_process:
        finish_run(cfg)
    return Path(cfg.output_dir) / "pipeline"


def describe_hardware(accelerator) -> str:
    """E.g. '2 x NVIDIA H100 80GB HBM3' or '1 x CPU (x86_64)', for the model card."""
    import platform

    import torch

    device = accelerator.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type.upper()} ({platform.machine()})"
    return f"{accelerator.num_processes} x {name}"


def finish_run(cfg: TrainConfig) -> None:
    """Write the training report, then push the pipeline when --push_to_hub (main process only)."""
    from .report import write_report

    output_dir = Path(cfg.output_dir)
    write_report(output_dir, steps=cfg.ddpm_num_inference_steps, scheduler=cfg.sample_scheduler, seed=cfg.seed)
    if cfg.push_to_hub:
        from .hub import push_pipeline

        repo_id = cfg.hub_model_id or output_dir.resolve().name
        url = push_pipeline(output_dir / "pipeline", repo_id, private=cfg.hub_private_repo)
        logger.info("pushed %s to %s", output_dir / "pipeline", url)
