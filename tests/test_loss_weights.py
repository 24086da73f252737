"""Learned loss weights per noise level (--learned_loss_weights, EDM2's uncertainty weighting)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline, DiffusionPipeline
from safetensors.torch import load_file

from flowers_ddpm.config.loading import build_config
from flowers_ddpm.config.validation import validate
from flowers_ddpm.errors import UserError
from flowers_ddpm.models.unet import build_noise_scheduler
from flowers_ddpm.objectives.loss_weights import LearnedLossWeights, weighted_loss

from .conftest import main, resume_from_copy, tiny_train_args


def test_the_weights_learn_each_noise_levels_mean_loss_and_keep_the_losss_scale():
    torch.manual_seed(0)
    scheduler = build_noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction")
    network = LearnedLossWeights(scheduler)
    optimizer = network.build_optimizer()
    # a profile like the v-prediction losses of a trained model: high at both ends, low in the middle
    profile = 0.08 + 0.6 * torch.exp(-torch.arange(1000) / 40.0) + 0.2 * torch.exp((torch.arange(1000) - 999) / 80.0)
    for _ in range(1500):
        t = torch.randint(0, 1000, (64,))
        mse = profile[t] * torch.distributions.Chi2(12.0).sample((64,)) / 12  # noisy per-example losses
        loss = weighted_loss(network, mse, t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe = torch.tensor([1, 20, 100, 300, 500, 700, 900, 999])
    with torch.no_grad():
        learned = torch.exp(network(probe))
    assert torch.allclose(learned, profile[probe], rtol=0.25), (learned, profile[probe])
    with torch.no_grad():
        u_grid = network(network.grid)
        weights = torch.exp(-network(torch.arange(1000))) / torch.exp(-u_grid).mean()
    assert abs(float(weights.mean()) - 1) < 0.05  # the same gradient scale as the plain mean
    assert float(weights[500] / weights[1]) > 4  # the middle levels pull harder than the near-clean ones


@pytest.mark.parametrize("overrides, message", [
    ({"objective": "edm", "prediction_type": "epsilon", "sample_scheduler": "edm-euler"}, "objective edm"),
    ({"snr_gamma": 5.0}, "choose one"),
])
def test_learned_weights_refuse_other_weightings(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(build_config({}, {"learned_loss_weights": True, "model_preset": "tiny", "resolution": 16,
                                   **overrides}))


def test_a_run_with_learned_weights_resumes_exactly_and_exports_a_plain_unet(image_folder, tmp_path, capsys):
    flags = dict(max_train_steps=6, checkpointing_steps=3, learned_loss_weights=True, log_data_order=True)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *tiny_train_args(image_folder, straight, **flags)]) == 0
    assert resume_from_copy(image_folder, straight, resumed, 3, **flags) == 0
    a, b = straight / "checkpoints" / "checkpoint-6", resumed / "checkpoints" / "checkpoint-6"
    for name in ("model.safetensors", "model_1.safetensors"):  # the UNet, then the weights' network
        first, second = load_file(a / name), load_file(b / name)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name
    assert "linear.weight" in load_file(a / "model_1.safetensors")
    assert torch.load(a / "optimizer_1.bin")["state"]  # its Adam state is saved too
    assert load_file(a / "model_1.safetensors")["linear.weight"].abs().sum() > 0  # it learned

    pipe = DiffusionPipeline.from_pretrained(str(straight / "pipeline"))
    assert isinstance(pipe, DDPMPipeline)
    plain = tmp_path / "plain"
    assert main(["train", *tiny_train_args(image_folder, plain, max_train_steps=1)]) == 0
    exported = load_file(straight / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == load_file(plain / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").keys()

    capsys.readouterr()
    code = main(["train", *tiny_train_args(image_folder, straight, max_train_steps=8, checkpointing_steps=3,
                                           resume_from_checkpoint="latest")])
    assert code == 2 and "learned_loss_weights" in capsys.readouterr().err
