"""The optimizer (AdamW), the learning-rate schedule and the EMA of a training run."""

from __future__ import annotations

import logging

import torch
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ..config.sections import OptimSettings, TrainConfig
from .device import prepare_model

logger = logging.getLogger(__name__)


def build_optimizer(params, optim: OptimSettings, fused: bool = True) -> torch.optim.AdamW:
    """AdamW as `optim` sets it; the fused kernel (one launch for all parameters; CUDA and CPU) unless `fused` is
    False, which gives PyTorch's default implementation as in diffusers' example."""
    kwargs = dict(lr=optim.learning_rate, betas=(optim.adam_beta1, optim.adam_beta2),
                  weight_decay=optim.adam_weight_decay, eps=optim.adam_epsilon)
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except RuntimeError as e:  # a device without fused kernels
            logger.info("fused AdamW unavailable (%s); using foreach", e)
            return torch.optim.AdamW(params, foreach=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_optimization(cfg: TrainConfig, model, parameters, accelerator, max_steps: int):
    """AdamW over `parameters`, the LR schedule and the EMA of `model`; returns (model, optimizer, lr_scheduler,
    ema) with model and optimizer prepared by accelerate."""
    set_seed(cfg.run.seed, device_specific=True)  # different noise and timesteps on each process
    optimizer = build_optimizer(parameters, cfg.optim)
    # Not passed to accelerator.prepare: prepared schedulers step once per process per call, which makes the
    # schedule depend on the number of processes. We step it once per optimizer step instead.
    lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.optim.lr_warmup_steps,
                                 num_training_steps=max_steps, step_rules=cfg.optim.lr_step_rules)
    ema = None
    if cfg.ema.use_ema:
        ema = EMAModel(model.parameters(), decay=cfg.ema.ema_max_decay, use_ema_warmup=True, inv_gamma=cfg.ema.ema_inv_gamma,
                       power=cfg.ema.ema_power, model_cls=type(model), model_config=model.config, foreach=True)
        ema.to(accelerator.device)
    model = prepare_model(model, cfg.speed.gradient_checkpointing, cfg.speed.compile,
                          cfg.speed.enable_xformers_memory_efficient_attention)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, lr_scheduler, ema
