"""The `train-classifier` command: a noise-aware classifier p(y | x_t, t) for classifier guidance.

It reuses the diffusion training's parts unchanged: the data path (streaming or decode cache, resumable), the
accelerate `Trainer` (EMA, checkpoints and resume, signals, logging) and the noise schedule flags
(`--ddpm_num_steps`, `--ddpm_beta_schedule`: they must match the diffusion model it will guide). Only the
objective (cross-entropy on x_t at a random t), the accuracy report and the export are specific to it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from accelerate.utils import set_seed

from .._util.atomic import atomic_files_into
from ..config.sections import TrainConfig
from ..config.validation import classifier_eval_timesteps
from ..data.stream import DataSource, hold_out
from ..errors import UserError
from ..evaluation.reference import real_image_batches
from ..models.classifier import classifier_for_unet
from ..models.unet import build_noise_scheduler, unet_kwargs, unet_overrides
from ..objectives.classifier import ClassifierObjective
from ..publish.report import LOSS_CURVE, plot_loss_curve
from .device import configure_backends
from .optimization import build_optimization
from .run_setup import device_batches, init_trackers, loop_settings, run_trainer, start_run
from .trainer import Trainer

logger = logging.getLogger(__name__)
ACCURACY_FILE = "accuracy.json"
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")


def separate_eval_split(cfg: TrainConfig) -> bool:
    return (cfg.classifier.classifier_eval_split or cfg.data.dataset_split) != cfg.data.dataset_split


def training_source(cfg: TrainConfig, source: DataSource) -> DataSource:
    """What the classifier trains on: without the accuracy report's images (a seeded, class-balanced sample), unless
    --classifier_eval_split names another split."""
    if separate_eval_split(cfg) or not (source.label_column and source.class_names):
        return source  # (data without classes is refused next, by classifier_classes)
    return hold_out(source, cfg.classifier.classifier_eval_images, cfg.run.seed)


class AccuracyEvaluator:
    """Top-1 accuracy at fixed noise levels on held-out center-cropped images, as many of each class as the data
    allow (each process scores its share, counts are summed), with the same noise at every evaluation; the main
    process writes <output_dir>/accuracy.json. The images are `classifier_eval_images` of --classifier_eval_split
    when it names another split, else the sample `training_source` removed from the training data."""

    def __init__(self, cfg: TrainConfig, accelerator, noise_scheduler, source: DataSource):
        self.accelerator, self.scheduler, self.seed = accelerator, noise_scheduler, cfg.run.seed
        self.levels = classifier_eval_timesteps(cfg)
        self.split = cfg.classifier.classifier_eval_split or cfg.data.dataset_split
        self.excluded = 0 if separate_eval_split(cfg) else len(source.held_out)
        eval_data = dataclasses.replace(cfg.data, dataset_split=self.split, center_crop=True)
        self.batches = [(images, labels) for _, images, labels in real_image_batches(
            eval_data, accelerator.process_index, accelerator.num_processes, cfg.run.eval_batch_size,
            cfg.classifier.classifier_eval_images, class_balanced=True,
            only=None if separate_eval_split(cfg) else source.held_out)]
        self.output = Path(cfg.run.output_dir) / ACCURACY_FILE

    @torch.no_grad()
    def accuracies(self, model) -> tuple[list[float], int, list[int]]:
        """(accuracy at each noise level, number of images, images per class) over all processes."""
        device = self.accelerator.device
        generator = torch.Generator().manual_seed(self.seed + self.accelerator.process_index)
        num_classes = model.config.num_classes
        # accuracy at each level, then the number of images, then the images of each class
        correct = torch.zeros(len(self.levels) + 1 + num_classes, device=device)
        for images, labels in self.batches:
            clean, labels = images.to(device).float() / 127.5 - 1, labels.to(device)
            correct[len(self.levels)] += len(labels)
            correct[len(self.levels) + 1:] += torch.bincount(labels, minlength=num_classes).float()
            for i, t in enumerate(self.levels):
                timesteps = torch.full((len(labels),), t, device=device, dtype=torch.long)
                noise = torch.randn(clean.shape, generator=generator).to(device)
                logits = model(self.scheduler.add_noise(clean, noise, timesteps), timesteps)
                correct[i] += (logits.argmax(-1) == labels).sum()
        if self.accelerator.num_processes > 1:
            correct = self.accelerator.reduce(correct, reduction="sum")
        values = correct.tolist()
        total = int(values[len(self.levels)])
        per_class = [int(v) for v in values[len(self.levels) + 1:]]
        return [c / max(total, 1) for c in values[:len(self.levels)]], total, per_class

    def __call__(self, model, step: int) -> dict:
        was_training = model.training
        model.eval()
        accuracy, total, per_class = self.accuracies(model)
        model.train(was_training)
        by_level = {str(t): round(a, 4) for t, a in zip(self.levels, accuracy)}
        if self.accelerator.is_main_process:
            report = {"step": step, "num_images": total, "split": self.split, "held_out": True,
                      "excluded_from_training": self.excluded, "images_per_class": per_class,
                      "chance": round(1 / len(per_class), 4), "accuracy": by_level}
            self.output.write_text(json.dumps(report, indent=2) + "\n")
            seen = ("held-out images (a seeded sample of each class, excluded from training)"
                    if self.excluded else f"images of the {self.split} split")
            logger.info("step %d: accuracy on %d %s (at least %d per class; chance %.3f) at t=%s", step, total, seen,
                        min(per_class), 1 / len(per_class), ", ".join(f"{t}: {a:.3f}" for t, a in by_level.items()))
        return {f"accuracy/t={t}": a for t, a in by_level.items()}


class ClassifierPublisher:
    """Exports the classifier (config.json with class names and noise schedule + safetensors) into output_dir;
    no sample grids."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)

    def sample_grid(self, model, step: int):
        return None

    def export(self, model, step: int, training_seconds: float) -> None:
        # file by file, each atomically: the output folder also holds checkpoints, logs and the report
        with atomic_files_into(self.output_dir, "classifier.tmp") as staging:
            model.save_pretrained(str(staging), safe_serialization=True)
        logger.info("exported the classifier at step %d to %s", step, self.output_dir)


def classifier_classes(cfg: TrainConfig, source) -> list[str]:
    """The class names to learn; a one-sentence error for data without labels."""
    if not source.class_names or len(source.class_names) < 2:
        raise UserError(f"train-classifier needs at least 2 classes, but {source.description} has "
                        f"{len(source.class_names or [])} (a local folder needs one sub-folder per class)")
    return list(source.class_names)


def build_classifier(cfg: TrainConfig, class_names: list[str], noise_scheduler):
    """The encoder half of the configured UNet preset with an attention-pooling head."""
    schedule = {k: noise_scheduler.config[k] for k in SCHEDULE_KEYS}
    return classifier_for_unet(unet_kwargs(cfg.model.model_preset, unet_overrides(cfg.model), cfg.data.resolution), cfg.data.resolution,
                               class_names, schedule)


def classifier_probe(cfg: TrainConfig, class_names: list[str]):
    """What `--mixed_precision auto` times: a fresh classifier, its parameters and objective."""
    def probe():
        noise_scheduler = build_noise_scheduler(cfg.model.ddpm_num_steps, cfg.model.ddpm_beta_schedule,
                                                cfg.model.prediction_type)
        model = build_classifier(cfg, class_names, noise_scheduler)
        return model, list(model.parameters()), ClassifierObjective(noise_scheduler)

    return probe


def run_classifier_training(cfg: TrainConfig) -> Path:
    """Train the noise-aware classifier as configured; returns the output folder (the exported classifier)."""
    if cfg.finetune.init_from or cfg.finetune.lora_rank or cfg.model.class_conditional:
        raise UserError("train-classifier trains a classifier from scratch; init_from, lora_rank and "
                        "class_conditional apply to the diffusion model (train)")
    if (Path(cfg.run.output_dir) / "pipeline").exists():
        raise UserError(f"output_dir {cfg.run.output_dir} holds a diffusion training run; give train-classifier its own "
                        "--output_dir")
    accelerator, source, class_names, max_steps, resume_from, per_epoch, _ = start_run(
        cfg, classifier_classes, classifier_probe, training_source)
    configure_backends(cfg.speed.allow_tf32)
    set_seed(cfg.run.seed)  # identical initial weights on every process
    noise_scheduler = build_noise_scheduler(cfg.model.ddpm_num_steps, cfg.model.ddpm_beta_schedule, cfg.model.prediction_type)
    model = build_classifier(cfg, class_names, noise_scheduler)
    evaluator = AccuracyEvaluator(cfg, accelerator, noise_scheduler, source)
    model, optimizer, lr_scheduler, ema = build_optimization(cfg, model, model.parameters(), accelerator, max_steps)
    batches = device_batches(cfg, source, accelerator)
    init_trackers(cfg, accelerator)
    settings = dataclasses.replace(loop_settings(cfg, max_steps, per_epoch), eval_steps=cfg.classifier.classifier_eval_steps or max_steps)
    trainer = Trainer(accelerator, model, ClassifierObjective(noise_scheduler), optimizer, lr_scheduler, ema,
                      batches, ClassifierPublisher(cfg.run.output_dir), settings, evaluator)
    run_trainer(trainer, accelerator, resume_from)
    if accelerator.is_main_process:
        plot_loss_curve(cfg.run.output_dir, Path(cfg.run.output_dir) / "report" / LOSS_CURVE)
    return Path(cfg.run.output_dir)
