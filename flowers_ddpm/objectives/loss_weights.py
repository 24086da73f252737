"""Learned loss weights per noise level (EDM2's uncertainty weighting: Karras et al. 2024, "Analyzing and Improving
the Training Dynamics of Diffusion Models", section 5; after Kendall et al. 2018).

The mean squared error of a diffusion model differs about tenfold between noise levels (v-prediction on the cosine
schedule: ~0.74 at t = 1, ~0.08 at t = 500, ~0.25 at t = 999), so a plain mean over uniformly drawn timesteps lets
the levels whose error cannot go down dominate the gradient. A small network u(t) (Fourier features of the
timestep's log-SNR, then one linear layer) is trained beside the UNet with the loss `mse * exp(-u) + u`, whose
minimum is u = log E[mse | t]; the UNet's loss is `mse * exp(-u)` with u held fixed, so every noise level pulls with
about the same strength. The weights are renormalised to mean 1 over uniform timesteps, so the gradient's scale (and
with it gradient clipping) stays that of the plain loss: only the balance between noise levels changes.

diffusers has no such module (its `compute_snr` weightings are fixed functions of the SNR), hence this file. The
network is training-only: it has its own optimizer (Adam, constant learning rate: it tracks a moving target),
is saved in the run's checkpoints by accelerate, and is not exported.
"""

from __future__ import annotations

import math

import torch
from diffusers.training_utils import compute_snr
from torch import nn

LEARNING_RATE = 1e-2  # of the weights' own Adam (measured: docs/recipes.md, fourteenth session)
_FEATURES = 128
_FEATURE_SEED = 12345  # the random Fourier frequencies and phases are fixed, not trained


class LearnedLossWeights(nn.Module):
    """u(t) ~ log E[mse | t] for the timesteps of `noise_scheduler`; `weighted_loss` below is the training loss."""

    def __init__(self, noise_scheduler):
        super().__init__()
        num_timesteps = noise_scheduler.config.num_train_timesteps
        log_snr = torch.log(compute_snr(noise_scheduler, torch.arange(num_timesteps)).double()).float()
        generator = torch.Generator().manual_seed(_FEATURE_SEED)
        self.register_buffer("position", log_snr / 8)  # log-SNR spans about -20..10: scaled to a few units
        self.register_buffer("frequencies", torch.randn(_FEATURES, generator=generator))
        self.register_buffer("phases", torch.rand(_FEATURES, generator=generator))
        self.register_buffer("grid", torch.linspace(0, num_timesteps - 1, 64).long())  # for the normalisation
        self.linear = nn.Linear(_FEATURES, 1)
        nn.init.zeros_(self.linear.weight)  # starts at u = 0: every weight 1, the plain loss
        nn.init.zeros_(self.linear.bias)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """u for each timestep (float32, on the timesteps' device)."""
        position = self.position[timesteps.to(self.position.device).long()]
        features = torch.cos(2 * math.pi * (position[:, None] * self.frequencies + self.phases)) * math.sqrt(2)
        return self.linear(features).squeeze(1).to(timesteps.device)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=LEARNING_RATE)


def weighted_loss(network: nn.Module, mse: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The UNet's weighted loss plus the weights' own loss (they share no parameters). `network` is a
    LearnedLossWeights, or accelerate's wrapper of one: it is called once per step (so a DDP wrapper averages its
    gradients), on the batch's timesteps and the normalisation grid together."""
    grid = getattr(network, "module", network).grid
    device_type = "cuda" if mse.is_cuda else "cpu"
    with torch.autocast(device_type, enabled=False):
        mse = mse.float()
        u_all = network(torch.cat([timesteps.long(), grid.to(timesteps.device)]))
        u, u_grid = u_all[:len(timesteps)], u_all[len(timesteps):].detach()
        weights = (torch.exp(-u) / torch.exp(-u_grid).mean()).detach()
        return (weights * mse).mean() + (mse.detach() * torch.exp(-u) + u).mean()
