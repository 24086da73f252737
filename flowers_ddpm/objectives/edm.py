"""EDM training (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

The UNet F is wrapped in the preconditioning D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x,
c_noise(sigma)), noise levels are drawn log-normally (ln sigma ~ N(P_mean, P_std^2)), and the loss
lambda(sigma) ||D(x + sigma n; sigma) - x||^2 uses the weight lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
which makes the effective target of F unit-variance at every noise level.

c_in, c_noise (= ln(sigma) / 4, fed to the UNet as its timestep) and c_skip / c_out come from the diffusers EDM
scheduler that is exported with the pipeline (`precondition_inputs`, `precondition_noise`, `precondition_outputs`),
so the model is trained in exactly the convention diffusers samples it in (including its `prediction_type`:
"epsilon" is EDM's F, "v_prediction" the same with c_out negated).
"""

from __future__ import annotations

import torch

from .diffusion import class_conditioning


class EDMObjective:
    """`objective(model, batch)` -> the EDM loss; class labels as in DiffusionObjective (label dropout for
    classifier-free guidance)."""

    def __init__(self, edm_scheduler, p_mean: float = -1.2, p_std: float = 1.2, num_classes=None,
                 class_dropout_prob: float = 0.0):
        self.scheduler = edm_scheduler
        self.sigma_data = float(edm_scheduler.config.sigma_data)
        self.p_mean, self.p_std = p_mean, p_std
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob

    def sample_sigmas(self, count: int, device) -> torch.Tensor:
        """Log-normal noise levels: ln(sigma) ~ N(P_mean, P_std^2)."""
        return (torch.randn(count, device=device) * self.p_std + self.p_mean).exp()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(self, model, noisy: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        """D(noisy; sigma): the preconditioned UNet, in the exported scheduler's convention."""
        s = sigma.reshape(-1, *([1] * (noisy.ndim - 1)))
        model_input = self.scheduler.precondition_inputs(noisy, s)
        c_noise = self.scheduler.precondition_noise(sigma)
        output = model(model_input, c_noise, class_labels=class_labels).sample
        return self.scheduler.precondition_outputs(noisy, output, s)

    def __call__(self, model, batch: dict) -> torch.Tensor:
        clean = batch["pixel_values"]
        sigma = self.sample_sigmas(clean.shape[0], clean.device)
        noisy = clean + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(clean)
        denoised = self.denoise(model, noisy, sigma, class_conditioning(batch, self.num_classes, self.class_dropout_prob))
        mse = (denoised.float() - clean.float()).pow(2).mean(dim=tuple(range(1, clean.ndim)))
        return (self.loss_weight(sigma) * mse).mean()
