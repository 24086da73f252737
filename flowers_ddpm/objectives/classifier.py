"""The noise-aware classifier's objective: cross-entropy on noised images at a random noise level."""

from __future__ import annotations

import torch


class ClassifierObjective:
    """Cross-entropy of the classifier on x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps at t uniform in [0, T)."""

    def __init__(self, noise_scheduler):
        self.scheduler = noise_scheduler
        self.num_timesteps = noise_scheduler.config.num_train_timesteps

    def __call__(self, model, batch: dict) -> torch.Tensor:
        clean = batch["pixel_values"]
        timesteps = torch.randint(0, self.num_timesteps, (clean.shape[0],), device=clean.device)
        noisy = self.scheduler.add_noise(clean, torch.randn_like(clean), timesteps)
        return torch.nn.functional.cross_entropy(model(noisy, timesteps).float(), batch["class_labels"])
