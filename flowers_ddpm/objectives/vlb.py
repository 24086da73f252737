"""The variational-bound term L_t of Improved DDPM's hybrid loss, for UNets that learn their variances.

diffusers samples with learned variances (`DDPMScheduler(variance_type="learned_range")`) but has no training-side
VLB, and no maintained library exports it; the formulas follow improved-diffusion's `gaussian_diffusion.py` and
`losses.py` (Nichol & Dhariwal 2021). Every term is in bits per dimension, one value per example.
"""

from __future__ import annotations

import math

import torch


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood (nats, elementwise) of images `x` in [-1, 1] quantised to 256 levels under N(means, exp(log_scales)^2).

    The outermost bins extend to -inf and +inf.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    log_cdf_plus = torch.special.log_ndtr(plus_in)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)
    cdf_delta = torch.special.ndtr(plus_in) - torch.special.ndtr(min_in)
    log_delta = torch.log(cdf_delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _per_example_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class VariationalBound:
    """L_t for a DDPMScheduler's noise schedule: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the
    decoder NLL -log p(x_0 | x_1) for t = 0, with p's variance interpolated as in `learned_range`."""

    def __init__(self, noise_scheduler):
        betas = noise_scheduler.betas.double()
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # t = 0 has zero posterior variance; like improved-diffusion, use t = 1's value there
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        self.prediction_type = noise_scheduler.config.prediction_type
        self.tables = {
            "alphas_cumprod": alphas_cumprod,
            "log_betas": torch.log(betas),
            "posterior_log_variance": torch.log(clipped),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
        }

    def _at(self, name: str, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        values = self.tables[name].to(like.device)[timesteps.to(like.device)].to(like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def predicted_clean(self, noisy, prediction, timesteps) -> torch.Tensor:
        """x_0 implied by the UNet's prediction (epsilon, v_prediction or sample)."""
        abar = self._at("alphas_cumprod", timesteps, noisy)
        if self.prediction_type == "epsilon":
            return (noisy - (1 - abar).sqrt() * prediction) / abar.sqrt()
        if self.prediction_type == "v_prediction":
            return abar.sqrt() * noisy - (1 - abar).sqrt() * prediction
        return prediction

    def posterior_mean(self, clean, noisy, timesteps) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        return self._at("posterior_mean_coef1", timesteps, noisy) * clean + self._at("posterior_mean_coef2", timesteps, noisy) * noisy

    def model_log_variance(self, variance_values, timesteps) -> torch.Tensor:
        """`learned_range`: log-variance interpolated between the posterior variance and beta_t by (v + 1) / 2."""
        frac = (variance_values + 1) / 2
        return frac * self._at("log_betas", timesteps, variance_values) + (1 - frac) * self._at(
            "posterior_log_variance", timesteps, variance_values)

    def terms(self, clean, noisy, timesteps, prediction, variance_values) -> torch.Tensor:
        """L_t in bits per dimension, one value per example. Pass `prediction` detached for the hybrid loss's
        stop-gradient on the mean (then only the variance is trained by this term)."""
        clean, noisy, prediction, variance_values = (x.double() for x in (clean, noisy, prediction, variance_values))
        true_mean = self.posterior_mean(clean, noisy, timesteps)
        true_log_variance = self._at("posterior_log_variance", timesteps, noisy).expand_as(noisy)
        model_mean = self.posterior_mean(self.predicted_clean(noisy, prediction, timesteps), noisy, timesteps)
        model_log_variance = self.model_log_variance(variance_values, timesteps)
        kl = _per_example_mean(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance))
        nll = -_per_example_mean(discretized_gaussian_log_likelihood(clean, model_mean, 0.5 * model_log_variance))
        return (torch.where(timesteps.to(kl.device) == 0, nll, kl) / math.log(2.0)).float()
