"""The `train` command: assemble config -> data -> model -> objective -> trainer -> export, then run it."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import yaml

from . import checkpointing
from ..config.loading import TrainConfig
from ..errors import UserError

logger = logging.getLogger(__name__)


def class_guidance(model, cfg: TrainConfig) -> dict:
    """Class-conditional models are sampled (grids, evaluation) cycling through all classes with the configured
    classifier-free guidance; unconditional models take no extra arguments."""
    if model.config.num_class_embeds is None:
        return {}
    labels = list(range(model.config.num_class_embeds - 1))  # the last embedding is the "no class" token
    return {"class_labels": labels, "guidance_scale": cfg.sample_guidance_scale}


class PipelinePublisher:
    """Sample grids (PNG under <output_dir>/samples/) and pipeline exports (<output_dir>/pipeline/)."""

    def __init__(self, cfg: TrainConfig, noise_scheduler, class_names=None, hardware: str = "unknown"):
        self.cfg, self.noise_scheduler, self.class_names = cfg, noise_scheduler, class_names
        self.output_dir = Path(cfg.output_dir)
        self.hardware, self.started = hardware, time.time()

    def _guidance(self, model) -> dict:
        return class_guidance(model, self.cfg)

    def sample_grid(self, model, step: int):
        from ..models.finetune import sampling_unet
        from ..pipelines.sampling import build_pipeline, generate, image_grid

        pipe = build_pipeline(sampling_unet(model), self.noise_scheduler, self.class_names)
        pipe.set_progress_bar_config(disable=True)
        was_training = model.training
        model.eval()
        images = generate(pipe, self.cfg.eval_batch_size, self.cfg.ddpm_num_inference_steps, seed=self.cfg.seed,
                          scheduler=self.cfg.sample_scheduler, batch_size=self.cfg.eval_batch_size,
                          **self._guidance(model))
        model.train(was_training)
        grid = image_grid(images)
        path = self.output_dir / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return grid

    def export(self, model, step: int) -> None:
        from ..models.finetune import ADAPTER_DIR, merged_unet, save_adapter
        from ..pipelines.sampling import export_pipeline
        from ..publish.report import write_training_info

        def write_extra(folder: Path) -> None:
            save_adapter(model, folder / ADAPTER_DIR, base_model=self.cfg.init_from)  # only for LoRA
            write_training_info(folder, step=step, seconds=time.time() - self.started, hardware=self.hardware)

        path = export_pipeline(merged_unet(model), self.noise_scheduler, self.output_dir / "pipeline",
                               yaml.safe_dump(self.cfg.to_dict(), sort_keys=False), self.class_names, write_extra)
        logger.info("exported pipeline at step %d to %s", step, path)


class TrainingEvaluator:
    """FID/KID of the weights it is given (the trainer passes the EMA weights) on all processes, every
    --eval_steps; keeps <output_dir>/best/ = the pipeline with the best FID so far (+ its metrics.json)."""

    def __init__(self, cfg: TrainConfig, accelerator, noise_scheduler, class_names=None):
        from ..evaluation.features import build_inception_network
        from ..evaluation.reference import load_or_compute_reference

        self.cfg, self.accelerator, self.noise_scheduler = cfg, accelerator, noise_scheduler
        self.class_names = class_names
        self.best_dir = Path(cfg.output_dir) / "best"
        network = build_inception_network(cfg.inception_weights, cfg.eval_feature_network)
        self.networks = {"inception": network.to(accelerator.device)}
        # center crops, like `flowers-ddpm evaluate`, so both share one cached reference
        reference_cfg = dataclasses.replace(cfg, center_crop=True)
        self.reference = load_or_compute_reference(accelerator, reference_cfg, self.networks, cfg.reference_cache_dir,
                                                   cfg.eval_batch_size, cfg.reference_num_images)
        best = self.best_dir / "metrics.json"
        self.best_fid = json.loads(best.read_text())["fid"] if best.is_file() else math.inf  # survives resumes

    def __call__(self, model, step: int) -> dict:
        from ..evaluation.evaluate import SamplingSettings, evaluate_pipeline
        from ..models.finetune import merged_unet, sampling_unet
        from ..pipelines.sampling import build_pipeline, export_pipeline

        cfg = self.cfg
        pipe = build_pipeline(sampling_unet(model), self.noise_scheduler, self.class_names)
        pipe.set_progress_bar_config(disable=True)
        was_training = model.training
        model.eval()
        guidance = class_guidance(pipe.unet, cfg)  # class-conditional: every class in turn, not "no class"
        sampling = SamplingSettings(cfg.eval_num_images, cfg.sample_scheduler, cfg.ddpm_num_inference_steps,
                                    cfg.seed, cfg.eval_batch_size, **guidance)
        row = evaluate_pipeline(self.accelerator, pipe, self.networks, self.reference, sampling,
                                with_precision_recall=False)
        model.train(was_training)
        if row["fid"] < self.best_fid:
            self.best_fid = row["fid"]
            if self.accelerator.is_main_process:
                export_pipeline(merged_unet(model), self.noise_scheduler, self.best_dir,
                                yaml.safe_dump(cfg.to_dict(), sort_keys=False), self.class_names)
                (self.best_dir / "metrics.json").write_text(json.dumps({"step": step, **row, **guidance}, indent=2)
                                                            + "\n")
                logger.info("step %d: FID %.4f, the best so far; pipeline written to %s", step, row["fid"], self.best_dir)
        self.accelerator.wait_for_everyone()
        return {f"eval/{key}": row[key] for key in ("fid", "kid_mean", "kid_std", "is_mean") if key in row}


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


def model_classes(cfg: TrainConfig, source):
    """The class names the UNet is conditioned on (None for an unconditional model)."""
    if not cfg.class_conditional:
        return None
    if not source.class_names:
        raise UserError(f"class_conditional needs class labels, but {source.description} has none "
                        "(a local folder needs one sub-folder per class)")
    return list(source.class_names)


def unet_overrides(cfg: TrainConfig) -> dict:
    """--unet_config with --dropout merged over it."""
    overrides = dict(cfg.unet_config or {})
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    return overrides


def _train_batches(cfg: TrainConfig, source, accelerator):
    """Batches from the decode-once cache (built first by one process per machine) or decoded from the stream."""
    from ..data.stream import build_train_batches

    if not cfg.decode_cache:
        return build_train_batches(cfg, source, accelerator.process_index, accelerator.num_processes)
    from ..data.cache import build_cached_batches, open_cache

    with accelerator.local_main_process_first():
        if accelerator.is_local_main_process:
            open_cache(cfg, source)
    return build_cached_batches(cfg, source, accelerator.process_index, accelerator.num_processes)


def start_run(cfg: TrainConfig, classes_of):
    """The checks and set-up every training command shares: resume checkpoint (checked for compatibility), the
    Accelerator, the data source, its classes (`classes_of(cfg, source)`, which may raise a UserError) and the
    number of optimizer steps. Returns (accelerator, source, class_names, max_steps, resume_from)."""
    from ..data.stream import open_source

    # cheap checks first: nothing expensive happens before these pass
    resume_from = checkpointing.resolve_resume_path(cfg.output_dir, cfg.resume_from_checkpoint)
    if resume_from is not None:
        checkpointing.check_compatible(resume_from, cfg.to_dict())
    if cfg.push_to_hub:
        from ..publish.hub import require_token

        require_token()
    accelerator = make_accelerator(cfg)
    source = open_source(cfg)
    class_names = classes_of(cfg, source)
    max_steps = resolve_max_train_steps(cfg, source.num_examples, accelerator.num_processes)
    if accelerator.is_main_process:
        logger.info("training on %s (%s examples) for %d steps on %d process(es)", source.description,
                    source.num_examples or "unknown", max_steps, accelerator.num_processes)
        cfg.save_yaml(Path(cfg.output_dir) / "training_config.yaml")
        (Path(cfg.output_dir) / "report").mkdir(exist_ok=True)  # the trainer appends report/loss.jsonl
    return accelerator, source, class_names, max_steps, resume_from


def build_optimization(cfg: TrainConfig, model, parameters, accelerator, max_steps: int):
    """AdamW over `parameters`, the LR schedule and the EMA of `model`; returns (model, optimizer, lr_scheduler,
    ema) with model and optimizer prepared by accelerate."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from .device import build_optimizer, prepare_model

    set_seed(cfg.seed, device_specific=True)  # different noise and timesteps on each process
    optimizer = build_optimizer(parameters, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
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
    return model, optimizer, lr_scheduler, ema


def loop_settings(cfg: TrainConfig, max_steps: int):
    """The trainer's LoopSettings from the config."""
    from .trainer import LoopSettings

    return LoopSettings(
        max_train_steps=max_steps, output_dir=cfg.output_dir, max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps, checkpointing_steps=cfg.checkpointing_steps,
        checkpoints_total_limit=cfg.checkpoints_total_limit, save_images_steps=cfg.save_images_steps,
        save_model_steps=cfg.save_model_steps, log_data_order=cfg.log_data_order, eval_steps=cfg.eval_steps,
        max_consecutive_nonfinite=cfg.max_consecutive_nonfinite, run_settings=cfg.to_dict(),
    )


def init_trackers(cfg: TrainConfig, accelerator) -> None:
    """Start the experiment tracker (main process) with the run's settings."""
    if accelerator.is_main_process:
        accelerator.init_trackers(cfg.tracker_project_name, config=_tracker_config(cfg))


def device_batches(cfg: TrainConfig, source, accelerator):
    """This process's training batches on the accelerator's device."""
    from .device import DeviceBatches

    return DeviceBatches(_train_batches(cfg, source, accelerator), accelerator.device, cfg.channels_last)


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


def run_training(cfg: TrainConfig, keep_process_group: bool = False) -> Path:
    """Train as configured and return the exported pipeline folder. `keep_process_group` leaves the distributed
    process group up for more work in this process (a sweep's next trial) instead of destroying it at the end."""
    from accelerate.utils import set_seed

    from ..models.finetune import add_class_conditioning, load_for_finetuning, select_trainable, trainable_parameters
    from ..models.unet import build_noise_scheduler, build_unet
    from ..objectives.diffusion import DiffusionObjective
    from .device import configure_backends
    from .trainer import Trainer

    accelerator, source, class_names, max_steps, resume_from = start_run(cfg, model_classes)
    num_classes = len(class_names) if class_names else None

    configure_backends(cfg.allow_tf32)
    set_seed(cfg.seed)  # identical initial weights on every process
    if cfg.init_from:
        model, noise_scheduler = load_for_finetuning(cfg)
        if num_classes:
            model = add_class_conditioning(model, num_classes + 1)  # zero-initialised: starts as the pretrained model
    else:
        model = build_unet(cfg.model_preset, cfg.resolution, unet_overrides(cfg), num_classes, cfg.learn_sigma)
        noise_scheduler = build_noise_scheduler(cfg.ddpm_num_steps, cfg.ddpm_beta_schedule, cfg.prediction_type,
                                                cfg.learn_sigma)
    model = select_trainable(model, cfg)  # everything, --train_only parts, or LoRA adapters
    objective = DiffusionObjective(noise_scheduler, cfg.snr_gamma, cfg.learn_sigma, cfg.vlb_weight, num_classes,
                                   cfg.class_dropout_prob)
    evaluator = TrainingEvaluator(cfg, accelerator, noise_scheduler, class_names) if cfg.eval_steps else None
    model, optimizer, lr_scheduler, ema = build_optimization(cfg, model, trainable_parameters(model), accelerator,
                                                             max_steps)
    batches = device_batches(cfg, source, accelerator)
    init_trackers(cfg, accelerator)
    trainer = Trainer(accelerator, model, objective, optimizer, lr_scheduler, ema, batches,
                      PipelinePublisher(cfg, noise_scheduler, class_names, describe_hardware(accelerator)),
                      loop_settings(cfg, max_steps), evaluator)
    run_trainer(trainer, accelerator, resume_from, keep_process_group)
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
    from ..publish.report import write_report

    output_dir = Path(cfg.output_dir)
    write_report(output_dir, steps=cfg.ddpm_num_inference_steps, scheduler=cfg.sample_scheduler, seed=cfg.seed)
    if cfg.push_to_hub:
        from ..publish.hub import push_pipeline

        repo_id = cfg.hub_model_id or output_dir.resolve().name
        url = push_pipeline(output_dir / "pipeline", repo_id, private=cfg.hub_private_repo)
        logger.info("pushed %s to %s", output_dir / "pipeline", url)
