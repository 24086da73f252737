"""The diffusion training objective: noise the batch, predict, and return the loss.

The trainer only calls ``objective(model, batch)``; everything about noise, timesteps, targets, loss weighting,
class-label dropout and the hybrid VLB term lives here.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.training_utils import compute_snr
from torch import nn

from .loss_weights import weighted_loss
from .vlb import VariationalBound


def class_conditioning(batch: dict, num_classes: Optional[int], dropout_prob: float) -> Optional[torch.Tensor]:
    """The batch's class labels for the UNet (None for an unconditional one), each replaced by the "no class" token
    `num_classes` with probability `dropout_prob` (classifier-free guidance training)."""
    if num_classes is None:
        return None
    labels = batch["class_labels"].to(batch["pixel_values"].device)
    dropped = torch.rand(labels.shape, device=labels.device) < dropout_prob
    return torch.where(dropped, torch.full_like(labels, num_classes), labels)


class TimestepSampler:
    """Draws the training timesteps: `uniform` over 0..T-1 (DDPM, diffusers' example), or `lognormal`: EDM's
    training noise levels (Karras et al. 2022, ln sigma ~ N(p_mean, p_std^2)) mapped to the discrete timestep whose
    noise level sigma_t = sqrt((1 - alphabar_t) / alphabar_t) is nearest in log space. The log-normal draw spends
    the training on the middle noise levels, where EDM found most of what a network can learn, instead of the
    near-pure-noise steps that take ~40% of a uniform draw under the linear schedule. Neither diffusers nor its
    training utilities have a timestep sampler for DDPM schedulers, hence this class."""

    def __init__(self, noise_scheduler, kind: str = "uniform", p_mean: float = -1.2, p_std: float = 1.2):
        if kind not in ("uniform", "lognormal"):  # the names of config.sections.TIMESTEP_SAMPLINGS
            raise ValueError(f"unknown timestep sampling {kind!r}")
        self.kind, self.p_mean, self.p_std = kind, p_mean, p_std
        self.num_timesteps = noise_scheduler.config.num_train_timesteps
        # log sigma_t = -log(SNR_t) / 2, increasing with t; the midpoints between neighbours split the log-sigma axis
        # into the cells that round to each timestep
        log_sigmas = -0.5 * torch.log(compute_snr(noise_scheduler, torch.arange(self.num_timesteps)).double())
        self.boundaries = ((log_sigmas[1:] + log_sigmas[:-1]) / 2).float()

    def __call__(self, count: int, device) -> torch.Tensor:
        if self.kind == "uniform":
            return torch.randint(0, self.num_timesteps, (count,), device=device)
        log_sigma = torch.randn(count) * self.p_std + self.p_mean
        return torch.bucketize(log_sigma, self.boundaries).to(device)


class DiffusionObjective:
    """MSE between the UNet output and the target chosen by the scheduler's `prediction_type`, optionally
    Min-SNR-gamma weighted or weighted per noise level by learned `loss_weights` (objectives/loss_weights.py), plus
    `vlb_weight * L_vlb` when the UNet learns its variances (Improved DDPM's hybrid
    loss). With `num_classes`, the batch's class labels condition the UNet and are replaced by the "no class" token
    `num_classes` with probability `class_dropout_prob` (classifier-free guidance training). Timesteps are drawn by
    `timestep_sampler` (uniform by default; see TimestepSampler).
    """

    def __init__(self, noise_scheduler, snr_gamma: Optional[float] = None, learn_sigma: bool = False,
                 vlb_weight: float = 0.001, num_classes: Optional[int] = None, class_dropout_prob: float = 0.0,
                 timestep_sampler: Optional[TimestepSampler] = None, loss_weights: Optional[nn.Module] = None):
        self.scheduler = noise_scheduler
        self.prediction_type = noise_scheduler.config.prediction_type
        self.num_timesteps = noise_scheduler.config.num_train_timesteps
        self.snr_gamma, self.vlb_weight = snr_gamma, vlb_weight
        self.vlb = VariationalBound(noise_scheduler) if learn_sigma else None
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.sample_timesteps = timestep_sampler or TimestepSampler(noise_scheduler)
        self.loss_weights = loss_weights  # LearnedLossWeights (objectives/loss_weights.py), or None

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The regression target for each prediction type (epsilon, v_prediction, sample)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(clean, noise, timesteps)
        if self.prediction_type == "sample":
            return clean
        raise ValueError(f"unsupported prediction_type {self.prediction_type}")

    def mse_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-example MSE weights: 1, or Min-SNR-gamma (Hang et al. 2023) expressed for the prediction type."""
        if self.snr_gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)

        snr = compute_snr(self.scheduler, timesteps).float()
        clipped = torch.clamp(snr, max=self.snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped  # sample (x0) prediction

    def conditioning(self, batch: dict) -> Optional[torch.Tensor]:
        """The class labels fed to the UNet, with labels dropped to "no class" at `class_dropout_prob`."""
        return class_conditioning(batch, self.num_classes, self.class_dropout_prob)

    def loss(self, output, clean, noise, timesteps, noisy) -> torch.Tensor:
        """The loss of one UNet output (3 channels, or 6 when it learns its variances)."""
        prediction, variance_values = (output.split(clean.shape[1], dim=1) if self.vlb else (output, None))
        target = self.target(clean, noise, timesteps)
        mse = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, clean.ndim)))
        if self.loss_weights is not None:
            loss = weighted_loss(self.loss_weights, mse, timesteps)
        else:
            loss = (self.mse_weights(timesteps) * mse).mean()
        if self.vlb is not None:
            # L_vlb = sum_t L_t, estimated as T * L_t at the sampled t; the mean is stopped (detach) so this term
            # trains only the variance. With T = 1000 and vlb_weight = 0.001 this is improved-diffusion's mse + vb.
            terms = self.vlb.terms(clean, noisy, timesteps, prediction.detach(), variance_values)
            loss = loss + self.vlb_weight * self.num_timesteps * terms.mean()
        return loss

    def __call__(self, model, batch: dict) -> torch.Tensor:
        clean = batch["pixel_values"]
        noise = torch.randn_like(clean)
        timesteps = self.sample_timesteps(clean.shape[0], clean.device)
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        output = model(noisy, timesteps, class_labels=self.conditioning(batch)).sample
        return self.loss(output, clean, noise, timesteps, noisy)
