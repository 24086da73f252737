"""`--timestep_sampling`: DDPM training timesteps drawn uniformly (diffusers' example) or from EDM's log-normal noise
levels mapped to the nearest discrete timestep (docs/recipes.md measured both)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flowers_ddpm.cli import main
from flowers_ddpm.config.loading import build_config
from flowers_ddpm.errors import UserError
from flowers_ddpm.models.unet import build_noise_scheduler
from flowers_ddpm.objectives.diffusion import DiffusionObjective, TimestepSampler

from .conftest import resume_from_copy, tiny_train_args

T = 1000
ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)  # the DDPM paper's linear schedule
LOG_SIGMA = 0.5 * torch.log((1 - ABAR) / ABAR)  # sigma_t of x_t / sqrt(alphabar_t) = x_0 + sigma_t * noise


def test_uniform_is_diffusers_draw():
    sampler = TimestepSampler(build_noise_scheduler(T, "linear", "v_prediction"))
    torch.manual_seed(0)
    t = sampler(50000, "cpu")
    assert t.min() == 0 and t.max() == T - 1 and abs(t.float().mean() - (T - 1) / 2) < 5


def test_lognormal_draws_the_timestep_nearest_to_an_edm_noise_level():
    sampler = TimestepSampler(build_noise_scheduler(T, "linear", "v_prediction"), "lognormal", -1.2, 1.2)
    torch.manual_seed(0)
    t = sampler(50000, "cpu")
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= T - 1
    # each drawn timestep is the one whose log sigma is nearest to the drawn log sigma: re-draw with the same seed
    torch.manual_seed(0)
    drawn = torch.randn(50000).double() * 1.2 - 1.2
    nearest = (drawn[:, None] - LOG_SIGMA[None, :]).abs().argmin(dim=1)
    assert (t == nearest).float().mean() > 0.999  # ties at cell boundaries may round either way in float32
    # the noise levels themselves are log-normal(-1.2, 1.2) where the schedule can represent them (sigma_0 = 0.01)
    inside = drawn > LOG_SIGMA[0]
    assert abs(LOG_SIGMA[t][inside].mean() - drawn[inside].mean()) < 0.01
    # most draws fall in the middle of the schedule, where uniform puts only a fraction of its draws
    assert (t < 500).float().mean() > 0.95


def test_the_objective_trains_on_the_sampled_timesteps():
    scheduler = build_noise_scheduler(T, "linear", "v_prediction")
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            seen.append(t)
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    objective = DiffusionObjective(scheduler, timestep_sampler=TimestepSampler(scheduler, "lognormal", 2.0, 1e-4))
    objective(Recorder(), {"pixel_values": torch.zeros(16, 3, 4, 4)})
    # ln sigma = 2 +- 1e-4: every timestep is the one of sigma = e^2
    assert set(seen[0].tolist()) == {int((LOG_SIGMA - 2.0).abs().argmin())}


def test_settings_are_checked():
    assert build_config({}, {}).objective.timestep_sampling == "uniform"
    assert build_config({}, {"timestep_sampling": "lognormal"}).objective.timestep_sampling == "lognormal"
    for flags, message in (({"timestep_sampling": "beta"}, "timestep_sampling"),
                           ({"timestep_sampling": "lognormal", "objective": "edm", "sample_scheduler": "edm-euler"},
                            "objective edm always draws log-normal"),
                           ({"timestep_sampling": "lognormal", "learn_sigma": True}, "assumes uniform timesteps")):
        with pytest.raises(UserError, match=message):
            build_config({}, flags)


def test_a_lognormal_run_resumes_exactly(image_folder, tmp_path):
    flags = dict(timestep_sampling="lognormal", max_train_steps=4, checkpointing_steps=2)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *tiny_train_args(image_folder, straight, **flags)]) == 0
    assert "timestep_sampling: lognormal" in (straight / "training_config.yaml").read_text()
    assert resume_from_copy(image_folder, straight, resumed, 2, **flags) == 0
    a = load_file(straight / "checkpoints" / "checkpoint-4" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
