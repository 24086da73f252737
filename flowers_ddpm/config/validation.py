"""Checks of the training settings that need no other stage: types, choices, ranges and combinations. Checks that
need a stage's knowledge live with it (the UNet presets: models/unet.py `check_preset`)."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError
from .sections import DDPM_SAMPLERS, EDM_SAMPLERS, FIELDS, TrainConfig


def validate(cfg: TrainConfig) -> None:
    """Reject invalid values with one line naming the setting and what is allowed."""
    for name, f in FIELDS.items():
        value = cfg.get(name)
        choices, minimum = f.metadata["choices"], f.metadata["min"]
        for item in value if isinstance(value, list) else [value]:  # a list setting: each of its values
            if isinstance(item, float) and not math.isfinite(item):  # nan passes every comparison
                raise UserError(f"{name} must be a finite number; got {value!r}")
            if choices and item is not None and item not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
            if minimum is not None and item is not None and item < minimum:
                raise UserError(f"{name} must be >= {minimum}; got {value!r}")
    if cfg.data.train_data_dir is not None and not Path(cfg.data.train_data_dir).is_dir():
        raise UserError(f"train_data_dir {cfg.data.train_data_dir} does not exist or is not a directory")
    validate_optimizer(cfg)
    _validate_evaluation(cfg)
    validate_paper_model(cfg)
    validate_edm(cfg)
    validate_phema(cfg)
    validate_finetune(cfg)
    validate_lr_schedule(cfg)
    validate_classifier(cfg)
    validate_guidance(cfg)


def classifier_eval_timesteps(cfg: TrainConfig) -> list[int]:
    """The noise levels of train-classifier's accuracy report."""
    steps = cfg.model.ddpm_num_steps
    if cfg.classifier.classifier_eval_timesteps is None:
        return sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    try:
        return [int(t) for t in cfg.classifier.classifier_eval_timesteps.split(",")]
    except ValueError:
        raise UserError("classifier_eval_timesteps must be comma-separated integers, e.g. 0,250,500,750,999; got "
                        f"{cfg.classifier.classifier_eval_timesteps!r}") from None


def validate_classifier(cfg: TrainConfig) -> None:
    """Checks of the train-classifier settings (issue 5)."""
    levels = classifier_eval_timesteps(cfg)
    if not levels or not all(0 <= t < cfg.model.ddpm_num_steps for t in levels):
        raise UserError(f"classifier_eval_timesteps must lie in [0, {cfg.model.ddpm_num_steps - 1}] (ddpm_num_steps - 1); "
                        f"got {cfg.classifier.classifier_eval_timesteps!r}")


def validate_guidance(cfg: TrainConfig) -> None:
    """Classifier-free guidance settings apply to class-conditional runs. The interval's own rule (two noise levels
    0 <= LO < HI) is GuidedDDPMPipeline's, checked with the pipelines when the run starts (training/run_setup.py)."""
    if cfg.run.sample_guidance_interval is not None and not cfg.model.class_conditional:
        raise UserError("sample_guidance_interval needs class_conditional (classifier-free guidance guides "
                        "class-conditional models)")


def validate_optimizer(cfg: TrainConfig) -> None:
    """Decay rates outside their range make the weights diverge (Adam's bias correction divides by 1 - beta**t)."""
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= cfg.get(name) < 1:
            raise UserError(f"{name} must be >= 0 and < 1; got {cfg.get(name)!r}")
    if not 0 <= cfg.ema.ema_max_decay <= 1:
        raise UserError(f"ema_max_decay must be between 0 and 1; got {cfg.ema.ema_max_decay!r}")


def _validate_evaluation(cfg: TrainConfig) -> None:
    if cfg.eval.inception_weights is not None and not Path(cfg.eval.inception_weights).is_file():
        raise UserError(f"inception_weights {cfg.eval.inception_weights} does not exist; pass the path of "
                        "weights-inception-2015-12-05-6726825d.pth")
    if cfg.eval.eval_feature_network is not None and ":" not in cfg.eval.eval_feature_network:
        raise UserError(f"eval_feature_network must be module:function; got {cfg.eval.eval_feature_network!r}")


def validate_paper_model(cfg: TrainConfig) -> None:
    """Checks of the issue-5 settings (loss weighting, learned variances, class conditioning)."""
    if cfg.objective.class_dropout_prob > 1:
        raise UserError(f"class_dropout_prob must be between 0 and 1; got {cfg.objective.class_dropout_prob}")
    if cfg.objective.augment_p > 1:
        raise UserError(f"augment_p must be between 0 and 1; got {cfg.objective.augment_p}")
    if cfg.objective.snr_gamma is not None and cfg.objective.snr_gamma <= 0:
        raise UserError(f"snr_gamma must be > 0 (or unset); got {cfg.objective.snr_gamma}")
    if cfg.objective.snr_gamma is not None and cfg.objective.learned_loss_weights:
        raise UserError("snr_gamma and learned_loss_weights are two loss weightings; choose one")
    if cfg.model.dropout is not None and cfg.model.dropout >= 1:
        raise UserError(f"dropout must be in [0, 1); got {cfg.model.dropout}")


def validate_edm(cfg: TrainConfig) -> None:
    """EDM training (issue 16): what it can be combined with, and which samplers draw from it; the log-normal
    timestep draw of the DDPM objective, which borrows EDM's noise levels."""
    edm = cfg.objective.objective == "edm"
    if cfg.objective.timestep_sampling != "uniform":
        if edm:
            raise UserError("timestep_sampling applies to objective ddpm; objective edm always draws log-normal noise "
                            "levels (edm_p_mean, edm_p_std)")
        if cfg.model.learn_sigma:
            raise UserError(f"timestep_sampling {cfg.objective.timestep_sampling} cannot be combined with learn_sigma "
                            "(its variational bound term assumes uniform timesteps)")
    if not edm:
        if cfg.run.sample_scheduler in EDM_SAMPLERS:
            raise UserError(f"sample_scheduler {cfg.run.sample_scheduler} samples models trained with --objective edm; "
                            f"use one of {', '.join(DDPM_SAMPLERS)}")
        return
    if cfg.model.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"objective edm takes prediction_type epsilon or v_prediction (diffusers' EDM schedulers); "
                        f"got {cfg.model.prediction_type}")
    for name, given in (("learn_sigma", cfg.model.learn_sigma), ("snr_gamma", cfg.objective.snr_gamma is not None),
                        ("init_from", cfg.finetune.init_from is not None),
                        ("learned_loss_weights", cfg.objective.learned_loss_weights)):
        if given:
            raise UserError(f"{name} cannot be combined with objective edm")
    if cfg.run.sample_scheduler not in EDM_SAMPLERS:
        raise UserError(f"sample_scheduler {cfg.run.sample_scheduler} is a DDPM sampler; a model trained with "
                        f"objective edm samples with {', '.join(EDM_SAMPLERS)}")
    if not 0 < cfg.objective.edm_sigma_min < cfg.objective.edm_sigma_max or cfg.objective.sigma_data <= 0:
        raise UserError("objective edm needs 0 < edm_sigma_min < edm_sigma_max and sigma_data > 0")


def validate_phema(cfg: TrainConfig) -> None:
    """Post-hoc EMA profiles: numbers in (0, 0.28); not with LoRA (the exported UNet is the merged one)."""
    text = cfg.ema.phema_sigma_rel
    if not text:
        return
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"phema_sigma_rel must be comma-separated numbers, e.g. 0.05,0.1; got {text!r}") from None
    if not values or not all(0 < v < 0.28 for v in values):  # the exponent gamma is positive below ~0.2887
        raise UserError(f"phema_sigma_rel values must lie in (0, 0.28); got {text!r}")
    if cfg.finetune.lora_rank is not None:
        raise UserError("phema_sigma_rel cannot be combined with lora_rank")


def validate_lr_schedule(cfg: TrainConfig) -> None:
    """piecewise_constant needs its rules, in the format diffusers' get_scheduler reads."""
    rules = cfg.optim.lr_step_rules
    if cfg.optim.lr_scheduler == "piecewise_constant" and not rules:
        raise UserError("lr_scheduler piecewise_constant needs lr_step_rules, e.g. 1:1000,0.1:2000,0.01 "
                        "(multiplier:until_step,...,final multiplier)")
    if rules:
        *steps, last = rules.split(",")
        try:
            [(float(m), int(s)) for m, s in (rule.split(":") for rule in steps)]
            float(last)
        except ValueError:
            raise UserError(f"lr_step_rules must look like 1:1000,0.1:2000,0.01; got {rules!r}") from None


def validate_finetune(cfg: TrainConfig) -> None:
    """Checks of the fine-tuning and publishing settings (issue 7)."""
    if cfg.finetune.lora_rank is not None and cfg.finetune.init_from is None:
        raise UserError("lora_rank needs init_from (LoRA adapts a pretrained UNet)")
    if cfg.finetune.lora_rank is not None and cfg.finetune.train_only:
        raise UserError("train_only and lora_rank cannot be combined (LoRA already trains only its adapters)")
    if cfg.finetune.lora_rank is None and cfg.finetune.lora_alpha is not None:
        raise UserError("lora_alpha needs lora_rank")
    if cfg.finetune.init_from and cfg.model.learn_sigma:
        raise UserError("learn_sigma cannot be combined with init_from (the pretrained UNet's output channels are fixed)")
