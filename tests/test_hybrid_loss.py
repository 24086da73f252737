"""The hybrid loss (L_simple + 0.001 * L_vlb) and Min-SNR weights against a direct computation from the formulas
of the DDPM / Improved DDPM papers, written out here independently of flowers_ddpm.objectives.vlb."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from flowers_ddpm.models.unet import build_noise_scheduler
from flowers_ddpm.objectives.diffusion import DiffusionObjective

T = 1000
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)  # the DDPM paper's linear schedule
ABAR = torch.cumprod(1 - BETAS, 0)


def fixed_tensors():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (5, 3, 4, 4), generator=g).double() / 127.5 - 1  # 8-bit images incl. -1 and 1
    clean[0, 0, 0, 0], clean[0, 0, 0, 1] = -1.0, 1.0
    noise = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    timesteps = torch.tensor([0, 1, 10, 500, 999])
    output = torch.cat([noise + 0.3 * torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64),  # predicted eps
                        torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1], dim=1)  # variance values
    abar = ABAR[timesteps].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * clean + (1 - abar).sqrt() * noise
    return clean, noise, timesteps, noisy, output


def reference_hybrid_loss(clean, noise, timesteps, noisy, output) -> float:
    eps, v = output[:, :3], output[:, 3:]
    mse = ((eps - noise) ** 2).mean()
    terms = []
    for i, t in enumerate(timesteps.tolist()):
        def posterior(step):
            abar_prev = ABAR[step - 1] if step > 0 else torch.tensor(1.0, dtype=torch.float64)
            c0 = abar_prev.sqrt() * BETAS[step] / (1 - ABAR[step])
            ct = (1 - BETAS[step]).sqrt() * (1 - abar_prev) / (1 - ABAR[step])
            return c0, ct, BETAS[step] * (1 - abar_prev) / (1 - ABAR[step])

        c0, ct, variance = posterior(t)
        min_log_variance = torch.log(posterior(1)[2] if t == 0 else variance)
        x0_hat = (noisy[i] - (1 - ABAR[t]).sqrt() * eps[i]) / ABAR[t].sqrt()
        model_mean = c0 * x0_hat + ct * noisy[i]
        frac = (v[i] + 1) / 2
        model_std = torch.exp(0.5 * (frac * torch.log(BETAS[t]) + (1 - frac) * min_log_variance))
        model = Normal(model_mean, model_std)
        if t == 0:  # discretised Gaussian decoder: bins of width 2/255 around each level, open at -1 and 1
            upper = torch.where(clean[i] > 0.999, torch.ones_like(clean[i]), model.cdf(clean[i] + 1 / 255))
            lower = torch.where(clean[i] < -0.999, torch.zeros_like(clean[i]), model.cdf(clean[i] - 1 / 255))
            terms.append(-torch.log(upper - lower).mean() / math.log(2))
        else:
            true = Normal(c0 * clean[i] + ct * noisy[i], variance.sqrt())
            terms.append(kl_divergence(true, model).mean() / math.log(2))
    return float(mse + 0.001 * T * torch.stack(terms).mean())


def test_hybrid_loss_equals_direct_computation_and_stops_the_mean_gradient():
    clean, noise, timesteps, noisy, output = fixed_tensors()
    objective = DiffusionObjective(build_noise_scheduler(T, "linear", "epsilon", learn_sigma=True), learn_sigma=True)
    output = output.float().requires_grad_(True)
    loss = objective.loss(output, clean.float(), noise.float(), timesteps, noisy.float())
    expected = reference_hybrid_loss(clean, noise, timesteps, noisy, output.detach().double())
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert 0.1 < expected - float(((output[:, :3].detach().double() - noise) ** 2).mean())  # the VLB term counts

    loss.backward()
    mse_gradient = 2 * (output[:, :3].detach() - noise.float()) / noise.numel()
    torch.testing.assert_close(output.grad[:, :3], mse_gradient)  # the VLB term does not move the mean
    assert output.grad[:, 3:].abs().sum() > 0  # it trains the variance


@pytest.mark.parametrize("prediction_type, expected", [
    ("epsilon", lambda snr: torch.clamp(snr, max=5.0) / snr),
    ("v_prediction", lambda snr: torch.clamp(snr, max=5.0) / (snr + 1)),
    ("sample", lambda snr: torch.clamp(snr, max=5.0)),
])
def test_min_snr_weights(prediction_type, expected):
    timesteps = torch.tensor([0, 50, 200, 999])
    objective = DiffusionObjective(build_noise_scheduler(T, "linear", prediction_type), snr_gamma=5.0)
    snr = ABAR[timesteps] / (1 - ABAR[timesteps])
    torch.testing.assert_close(objective.mse_weights(timesteps).double(), expected(snr), rtol=1e-3, atol=0)
