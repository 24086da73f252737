"""The `train` command: assemble config -> data -> model -> objective -> trainer -> export, then run it."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Callable, Optional

import yaml
from accelerate.utils import set_seed

from .._util.atomic import atomic_folder
from .._util.distributed import together
from ..config.diffusers_compat import run_differences
from ..config.sections import TrainConfig
from ..errors import UserError
from ..evaluation.evaluate import SamplingSettings, evaluate_pipeline
from ..evaluation.features import build_inception_network
from ..evaluation.reference import load_or_compute_reference
from ..models.finetune import (
    ADAPTER_DIR,
    add_class_conditioning,
    load_for_finetuning,
    merged_unet,
    sampling_unet,
    save_adapter,
    select_trainable,
    trainable_parameters,
)
from ..models.augment_conditioning import attach_augment_conditioning, augment_labels, without_augment_conditioning
from ..models.unet import build_edm_scheduler, build_noise_scheduler, build_unet, unet_overrides
from ..objectives.augment import LABEL_DIM, AugmentedObjective, AugmentPipe
from ..objectives.diffusion import DiffusionObjective, TimestepSampler
from ..objectives.edm import EDMObjective
from ..objectives.loss_weights import LearnedLossWeights
from ..pipelines.export import build_pipeline, export_pipeline
from ..pipelines.sampling import generate, image_grid
from ..publish.hub import push_pipeline
from ..publish.report import write_report, write_training_info
from .device import configure_backends
from .optimization import build_optimization
from .phema import PowerFunctionEMA, parse_sigma_rels
from .run_setup import (
    describe_hardware,
    device_batches,
    effective_precision,
    init_trackers,
    loop_settings,
    run_trainer,
    start_run,
)
from .trainer import Trainer

logger = logging.getLogger(__name__)


def guidance_defaults(cfg: TrainConfig) -> dict:
    """The classifier-free guidance a run samples with, which its exports save as their defaults (so that `sample`
    and `evaluate` draw what the grids and the in-training FID showed)."""
    return {"guidance_scale": cfg.run.sample_guidance_scale, "guidance_interval": cfg.run.sample_guidance_interval}


def class_guidance(model, cfg: TrainConfig) -> dict:
    """Class-conditional models are sampled (grids, evaluation) cycling through all classes with the run's
    classifier-free guidance (scale, and interval of noise levels when set); unconditional models take no extra
    arguments."""
    if model.config.num_class_embeds is None:
        return {}
    labels = list(range(model.config.num_class_embeds - 1))  # the last embedding is the "no class" token
    return {"class_labels": labels, **{k: v for k, v in guidance_defaults(cfg).items() if v is not None}}


class PipelinePublisher:
    """Sample grids (PNG under <output_dir>/samples/) and pipeline exports (<output_dir>/pipeline/)."""

    def __init__(self, cfg: TrainConfig, noise_scheduler, class_names=None, hardware: str = "unknown",
                 speed: Optional[dict] = None):
        self.cfg, self.noise_scheduler, self.class_names = cfg, noise_scheduler, class_names
        self.output_dir = Path(cfg.run.output_dir)
        self.hardware, self.speed = hardware, speed

    def _guidance(self, model) -> dict:
        return class_guidance(model, self.cfg)

    def sample_grid(self, model, step: int):
        pipe = build_pipeline(sampling_unet(model), self.noise_scheduler, self.class_names,
                              **guidance_defaults(self.cfg))
        pipe.set_progress_bar_config(disable=True)
        was_training = model.training
        model.eval()
        images = generate(pipe, self.cfg.run.eval_batch_size, self.cfg.run.ddpm_num_inference_steps, seed=self.cfg.run.seed,
                          scheduler=self.cfg.run.sample_scheduler, batch_size=self.cfg.run.eval_batch_size,
                          **self._guidance(model))
        model.train(was_training)
        grid = image_grid(images)
        path = self.output_dir / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return grid

    def export(self, model, step: int, training_seconds: float) -> None:
        def write_extra(folder: Path) -> None:
            save_adapter(model, folder / ADAPTER_DIR, base_model=self.cfg.finetune.init_from)  # only for LoRA
            write_training_info(folder, step=step, seconds=training_seconds, hardware=self.hardware,
                                speed=self.speed)

        with without_augment_conditioning(merged_unet(model)) as unet:  # the trained model at augment labels 0
            path = export_pipeline(unet, self.noise_scheduler, self.output_dir / "pipeline",
                                   yaml.safe_dump(self.cfg.to_dict(), sort_keys=False), self.class_names, write_extra,
                                   **guidance_defaults(self.cfg))
        logger.info("exported pipeline at step %d to %s", step, path)
        if self.cfg.run.keep_exports:
            with atomic_folder(self.output_dir / "exports" / f"step-{step:07d}") as copy:
                shutil.copytree(path, copy, dirs_exist_ok=True)


class TrainingEvaluator:
    """FID/KID of the weights it is given (the trainer passes the EMA weights) on all processes, every
    --eval_steps; keeps <output_dir>/best/ = the pipeline with the best FID so far (+ its metrics.json).
    `on_result(step, row)`, when given, sees each evaluation's metrics (a search's pruning: it may raise to stop)."""

    def __init__(self, cfg: TrainConfig, accelerator, noise_scheduler, class_names=None,
                 on_result: Optional[Callable[[int, dict], None]] = None):
        self.cfg, self.accelerator, self.noise_scheduler = cfg, accelerator, noise_scheduler
        self.on_result = on_result
        self.class_names = class_names
        self.best_dir = Path(cfg.run.output_dir) / "best"
        network = build_inception_network(cfg.eval.inception_weights, cfg.eval.eval_feature_network)
        self.networks = {"inception": network.to(accelerator.device)}
        # center crops, like `flowers-ddpm evaluate`, so both share one cached reference
        reference_data = dataclasses.replace(cfg.data, center_crop=True)
        self.reference = load_or_compute_reference(accelerator, reference_data, self.networks, cfg.eval.reference_cache_dir,
                                                   cfg.run.eval_batch_size, cfg.eval.reference_num_images)
        best = self.best_dir / "metrics.json"
        self.best_fid = json.loads(best.read_text())["fid"] if best.is_file() else math.inf  # survives resumes

    def __call__(self, model, step: int) -> dict:
        cfg = self.cfg
        pipe = build_pipeline(sampling_unet(model), self.noise_scheduler, self.class_names, **guidance_defaults(cfg))
        pipe.set_progress_bar_config(disable=True)
        was_training = model.training
        model.eval()
        guidance = class_guidance(pipe.unet, cfg)  # class-conditional: every class in turn, not "no class"
        sampling = SamplingSettings(cfg.eval.eval_num_images, cfg.run.sample_scheduler, cfg.run.ddpm_num_inference_steps,
                                    cfg.run.seed, cfg.run.eval_batch_size, **guidance)
        row = evaluate_pipeline(self.accelerator, pipe, self.networks, self.reference, sampling,
                                with_precision_recall=False)
        model.train(was_training)
        better = row["fid"] < self.best_fid
        self.best_fid = min(self.best_fid, row["fid"])
        with together(self.accelerator):  # in place of a barrier: a refused write stops every process at once
            if better and self.accelerator.is_main_process:
                network = self.networks["inception"]  # the card labels FIDs of other networks as not comparable
                metrics = json.dumps({"step": step, **row, **guidance,
                                      "feature_network": getattr(network, "name", type(network).__name__)},
                                     indent=2) + "\n"
                # inside the new folder before it replaces the old one: best/ and its metrics always match
                with without_augment_conditioning(merged_unet(model)) as unet:
                    export_pipeline(unet, self.noise_scheduler, self.best_dir,
                                    yaml.safe_dump(cfg.to_dict(), sort_keys=False), self.class_names,
                                    lambda folder: (folder / "metrics.json").write_text(metrics),
                                    **guidance_defaults(cfg))
                logger.info("step %d: FID %.4f, the best so far; pipeline written to %s", step, row["fid"], self.best_dir)
        if self.on_result is not None:
            self.on_result(step, row)
        return {f"eval/{key}": row[key] for key in ("fid", "kid_mean", "kid_std", "is_mean") if key in row}


def model_classes(cfg: TrainConfig, source):
    """The class names the UNet is conditioned on (None for an unconditional model)."""
    if not cfg.model.class_conditional:
        return None
    if not source.class_names:
        raise UserError(f"class_conditional needs class labels, but {source.description} has none "
                        "(a local folder needs one sub-folder per class)")
    return list(source.class_names)


def build_scheduler(cfg: TrainConfig):
    """The scheduler trained through and exported with the pipeline: DDPM's, or diffusers' EDM DPM-Solver++."""
    if cfg.objective.objective == "edm":
        o = cfg.objective
        return build_edm_scheduler(o.sigma_data, o.edm_sigma_min, o.edm_sigma_max, cfg.model.prediction_type)
    return build_noise_scheduler(cfg.model.ddpm_num_steps, cfg.model.ddpm_beta_schedule, cfg.model.prediction_type,
                                 cfg.model.learn_sigma)


def build_objective(cfg: TrainConfig, noise_scheduler, num_classes):
    """`--objective ddpm` (DiffusionObjective) or `edm` (EDMObjective), from the objective section; with
    `--augment_p`, on augmented batches (AugmentedObjective)."""
    o = cfg.objective
    if o.objective == "edm":
        objective = EDMObjective(noise_scheduler, o.edm_p_mean, o.edm_p_std, num_classes, o.class_dropout_prob)
    else:
        timesteps = TimestepSampler(noise_scheduler, o.timestep_sampling, o.edm_p_mean, o.edm_p_std)
        loss_weights = LearnedLossWeights(noise_scheduler) if o.learned_loss_weights else None
        objective = DiffusionObjective(noise_scheduler, o.snr_gamma, cfg.model.learn_sigma, o.vlb_weight,
                                       num_classes, o.class_dropout_prob, timesteps, loss_weights)
    return AugmentedObjective(objective, AugmentPipe(o.augment_p), augment_labels) if o.augment_p > 0 else objective


def prepare_loss_weights(objective, accelerator) -> list:
    """The learned loss weights' network and its optimizer, prepared by accelerate (gradients averaged over
    processes, both saved in every checkpoint); returns the extra optimizers the trainer steps (none without)."""
    inner = getattr(objective, "objective", objective)  # (inside AugmentedObjective)
    if getattr(inner, "loss_weights", None) is None:
        return []
    network, optimizer = accelerator.prepare(inner.loss_weights, inner.loss_weights.build_optimizer())
    inner.loss_weights = network
    return [optimizer]


def build_model(cfg: TrainConfig, num_classes):
    """The UNet to train (preset or fine-tuned, with what trains selected), its noise scheduler and objective."""
    if cfg.finetune.init_from:
        model, noise_scheduler = load_for_finetuning(cfg.finetune.init_from, cfg.data.resolution, cfg.model)
        if num_classes:
            model = add_class_conditioning(model, num_classes + 1)  # zero-initialised: starts as the pretrained model
    else:
        overrides = unet_overrides(cfg.model)
        model = build_unet(cfg.model.model_preset, cfg.data.resolution, overrides, num_classes, cfg.model.learn_sigma)
        noise_scheduler = build_scheduler(cfg)
    model = select_trainable(model, cfg.finetune)  # everything, --train_only parts, or LoRA adapters
    if cfg.objective.augment_p > 0:  # a trainable, training-only input; dropped at export
        attach_augment_conditioning(sampling_unet(model), LABEL_DIM)
    objective = build_objective(cfg, noise_scheduler, num_classes)
    return model, noise_scheduler, objective


def model_probe(cfg: TrainConfig, class_names):
    """What `--mixed_precision auto` times: a fresh copy of the model, trainable parameters and objective."""
    def probe():
        model, _, objective = build_model(cfg, len(class_names) if class_names else None)
        return model, trainable_parameters(model), objective

    return probe


def run_training(cfg: TrainConfig, keep_process_group: bool = False,
                 on_evaluation: Optional[Callable[[int, dict], None]] = None) -> Path:
    """Train as configured and return the exported pipeline folder. `keep_process_group` leaves the distributed
    process group up for more work in this process (a sweep's next trial) instead of destroying it at the end.
    `on_evaluation(step, metrics)` is called after each --eval_steps evaluation (a sweep's pruning)."""
    accelerator, source, class_names, max_steps, resume_from, per_epoch, speed = start_run(cfg, model_classes,
                                                                                           model_probe)
    differences = run_differences(cfg)
    if accelerator.is_main_process and differences:
        logger.info("defaults that differ from diffusers' train_unconditional.py (docs/diffusers-compatibility.md): "
                    "%s", "; ".join(differences))
    num_classes = len(class_names) if class_names else None

    configure_backends(cfg.speed.allow_tf32)
    set_seed(cfg.run.seed)  # identical initial weights on every process
    model, noise_scheduler, objective = build_model(cfg, num_classes)
    evaluator = (TrainingEvaluator(cfg, accelerator, noise_scheduler, class_names, on_evaluation)
                 if cfg.eval.eval_steps else None)
    model, optimizer, lr_scheduler, ema = build_optimization(cfg, model, trainable_parameters(model), accelerator,
                                                             max_steps)
    extra_optimizers = prepare_loss_weights(objective, accelerator)
    batches = device_batches(cfg, source, accelerator)
    init_trackers(cfg, accelerator)
    phema = None
    if cfg.ema.phema_sigma_rel:  # post-hoc EMA profiles of the (unwrapped) model's parameters
        phema = PowerFunctionEMA(accelerator.unwrap_model(model).named_parameters(),
                                 parse_sigma_rels(cfg.ema.phema_sigma_rel))
    trainer = Trainer(accelerator, model, objective, optimizer, lr_scheduler, ema, batches,
                      PipelinePublisher(cfg, noise_scheduler, class_names, describe_hardware(accelerator),
                                        speed.records(effective_precision(accelerator))),
                      loop_settings(cfg, max_steps, per_epoch), evaluator, phema, extra_optimizers)
    run_trainer(trainer, accelerator, resume_from, keep_process_group)
    if accelerator.is_main_process:
        finish_run(cfg)
        print(training_summary(cfg, trainer.summary), flush=True)
    return Path(cfg.run.output_dir) / "pipeline"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"


def _rows(rows) -> list[str]:
    return [f"  {name:<12}{where}" + (f"   ({note})" if note else "") for name, where, note in rows]


def training_summary(cfg: TrainConfig, summary) -> str:
    """The lines printed when `train` ends: what was done, how fast, and where everything is."""
    out = Path(cfg.run.output_dir)
    resumed = summary.steps < summary.global_step
    lines = [f"Training finished at step {summary.global_step}: {summary.steps} steps in {_duration(summary.seconds)}"
             + (" (this resumed part)" if resumed else "") + f", {summary.images_per_sec:.1f} images/s"
             + (f"; {_duration(summary.training_seconds)} over every resumed part" if resumed else ""),
             *_rows([("pipeline", out / "pipeline", f"flowers-ddpm sample --model {out / 'pipeline'}"),
                     ("samples", out / "samples", "the grids sampled during training"),
                     ("report", out / "report", "loss curve, samples over training, denoising")])]
    logs = out / cfg.run.logging_dir
    if cfg.run.logger == "tensorboard":
        lines += _rows([("logs", logs, f"tensorboard --logdir {logs}")])
    elif cfg.run.logger == "wandb":
        lines += _rows([("logs", f"wandb project {cfg.run.tracker_project_name}", "")])
    lines += _rows([("checkpoints", out / "checkpoints", "to continue: --resume_from_checkpoint latest")])
    return "\n".join(lines)


def finish_run(cfg: TrainConfig) -> None:
    """Write the training report, then push the pipeline when --push_to_hub (main process only)."""
    output_dir = Path(cfg.run.output_dir)
    write_report(output_dir, steps=cfg.run.ddpm_num_inference_steps, scheduler=cfg.run.sample_scheduler, seed=cfg.run.seed)
    if cfg.hub.push_to_hub:
        repo_id = cfg.hub.hub_model_id or output_dir.resolve().name
        url = push_pipeline(output_dir / "pipeline", repo_id, private=cfg.hub.hub_private_repo, token=cfg.hub.hub_token)
        logger.info("pushed %s to %s", output_dir / "pipeline", url)
