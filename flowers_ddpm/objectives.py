"""The diffusion training objective: noise the batch, predict, and return the loss.

The trainer only calls ``objective(model, batch)``; everything about noise, timesteps and targets lives here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DiffusionObjective:
    """MSE between the UNet output and the target chosen by the scheduler's `prediction_type`."""

    def __init__(self, noise_scheduler):
        self.scheduler = noise_scheduler
        self.prediction_type = noise_scheduler.config.prediction_type
        self.num_timesteps = noise_scheduler.config.num_train_timesteps

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The regression target for each prediction type (epsilon, v_prediction, sample)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(clean, noise, timesteps)
        if self.prediction_type == "sample":
            return clean
        raise ValueError(f"unsupported prediction_type {self.prediction_type}")

    def __call__(self, model, batch: dict) -> torch.Tensor:
        clean = batch["pixel_values"]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.num_timesteps, (clean.shape[0],), device=clean.device)
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        prediction = model(noisy, timesteps).sample
        return F.mse_loss(prediction.float(), self.target(clean, noise, timesteps).float())
