"""The `train` command: assemble config -> data -> model -> objective -> trainer -> export, then run it."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import yaml

from . import checkpointing
from .config import TrainConfig
from .errors import UserError

logger = logging.getLogger(__name__)


class PipelinePublisher:
    """Sample grids (PNG under <output_dir>/samples/) and pipeline exports (<output_dir>/pipeline/)."""

    def __init__(self, cfg: TrainConfig, noise_scheduler):
        self.cfg, self.noise_scheduler = cfg, noise_scheduler
        self.output_dir = Path(cfg.output_dir)

    def sample_grid(self, model, step: int):
        from .pipeline import build_pipeline, generate, image_grid

        pipe = build_pipeline(model, self.noise_scheduler)
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
        from .pipeline import export_pipeline

        path = export_pipeline(model, self.noise_scheduler, self.output_dir / "pipeline",
                               yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
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


def _train_batches(cfg: TrainConfig, source, accelerator):
    """Batches from the decode-once cache (built first by one process per machine) or decoded from the stream."""
    from .data import build_train_batches

    if not cfg.decode_cache:
        return build_train_batches(cfg, source, accelerator.process_index, accelerator.num_processes)
    from .cache import build_cached_batches, open_cache

    with accelerator.local_main_process_first():
        if accelerator.is_local_main_process:
            open_cache(cfg, source)
    return build_cached_batches(cfg, source, accelerator.process_index, accelerator.num_processes)


def run_training(cfg: TrainConfig) -> Path:
    """Train as configured and return the exported pipeline folder."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from .data import open_source
    from .models import build_noise_scheduler, build_unet
    from .objectives import DiffusionObjective
    from .performance import DeviceBatches, build_optimizer, configure_backends, prepare_model
    from .trainer import LoopSettings, Trainer

    # cheap checks first: nothing expensive happens before these pass
    resume_from = checkpointing.resolve_resume_path(cfg.output_dir, cfg.resume_from_checkpoint)
    accelerator = make_accelerator(cfg)
    source = open_source(cfg)
    max_steps = resolve_max_train_steps(cfg, source.num_examples, accelerator.num_processes)
    if accelerator.is_main_process:
        logger.info("training on %s (%s examples) for %d steps on %d process(es)", source.description,
                    source.num_examples or "unknown", max_steps, accelerator.num_processes)
        cfg.save_yaml(Path(cfg.output_dir) / "training_config.yaml")

    configure_backends(cfg.allow_tf32)
    set_seed(cfg.seed)  # identical initial weights on every process
    model = build_unet(cfg.model_preset, cfg.resolution, cfg.unet_config)
    noise_scheduler = build_noise_scheduler(cfg.ddpm_num_steps, cfg.ddpm_beta_schedule, cfg.prediction_type)
    set_seed(cfg.seed, device_specific=True)  # different noise and timesteps on each process
    optimizer = build_optimizer(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    # Not passed to accelerator.prepare: prepared schedulers step once per process per call, which makes the
    # schedule depend on the number of processes. We step it once per optimizer step instead.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps)
    ema = None
    if cfg.use_ema:
        ema = EMAModel(model.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True, inv_gamma=cfg.ema_inv_gamma,
                       power=cfg.ema_power, model_cls=type(model), model_config=model.config, foreach=True)
        ema.to(accelerator.device)
    model = prepare_model(model, cfg.gradient_checkpointing, cfg.compile)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = DeviceBatches(_train_batches(cfg, source, accelerator), accelerator.device, cfg.channels_last)
    if accelerator.is_main_process:
        accelerator.init_trackers(cfg.tracker_project_name, config=_tracker_config(cfg))

    settings = LoopSettings(
        max_train_steps=max_steps, output_dir=cfg.output_dir, max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps, checkpointing_steps=cfg.checkpointing_steps,
        checkpoints_total_limit=cfg.checkpoints_total_limit, save_images_steps=cfg.save_images_steps,
        save_model_steps=cfg.save_model_steps, log_data_order=cfg.log_data_order,
    )
    trainer = Trainer(accelerator, model, DiffusionObjective(noise_scheduler), optimizer, lr_scheduler, ema, batches,
                      PipelinePublisher(cfg, noise_scheduler), settings)
    trainer.train(resume_from)
    if batches.skipped and accelerator.is_main_process:
        logger.warning("skipped %d unreadable images", batches.skipped)
    accelerator.end_training()
    return Path(cfg.output_dir) / "pipeline"
