"""EDM-style training (issue 16, Karras et al. 2022): the preconditioning follows diffusers' EDM schedulers, a tiny
model learns a generated colour folder (class-conditional with guidance, and unconditional), the export loads in
plain diffusers without flowers_ddpm, samplers of the wrong family are refused, and resuming is exact."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from diffusers import EDMEulerScheduler
from safetensors.torch import load_file

from flowers_ddpm.cli import main
from flowers_ddpm.config.loading import build_config
from flowers_ddpm.errors import UserError
from flowers_ddpm.models.unet import build_edm_scheduler, build_noise_scheduler
from flowers_ddpm.objectives.edm import EDMObjective
from flowers_ddpm.pipelines.sampling import generate, load_pipeline, make_scheduler

from .conftest import in_plain_diffusers, make_class_folder, resume_from_copy, tiny_train_args

COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}  # sub-folder order = label order
CHANNEL_OF_CLASS = {0: 2, 1: 1, 2: 0}
TRAIN = dict(objective="edm", resolution=8, max_train_steps=150, train_batch_size=8, learning_rate=3e-3,
             lr_warmup_steps=10, lr_scheduler="constant_with_warmup", use_ema=False, checkpointing_steps=1000,
             eval_batch_size=3)


class Recorder(torch.nn.Module):
    """A stand-in UNet that records its inputs and returns a fixed output."""

    def __init__(self, output):
        super().__init__()
        self.output, self.calls = output, []

    def forward(self, x, t, class_labels=None):
        self.calls.append((x, t, class_labels))
        return type("Out", (), {"sample": self.output})()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_preconditioning_is_edm_in_the_exported_schedulers_convention(prediction_type):
    sd = 0.5
    scheduler = build_edm_scheduler(sigma_data=sd, prediction_type=prediction_type)
    objective = EDMObjective(scheduler)
    x, sigma = torch.randn(3, 3, 4, 4), torch.tensor([0.01, 0.5, 20.0])
    f = torch.randn(3, 3, 4, 4)
    model = Recorder(f)
    denoised = objective.denoise(model, x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    # Karras et al. 2022, Table 1: c_in, c_noise, c_skip, c_out (negated for diffusers' v_prediction)
    torch.testing.assert_close(model.calls[0][0], x / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(model.calls[0][1], sigma.log() / 4)
    sign = 1 if prediction_type == "epsilon" else -1
    torch.testing.assert_close(denoised, sd**2 / (s**2 + sd**2) * x + sign * s * sd / (s**2 + sd**2).sqrt() * f)
    torch.testing.assert_close(objective.loss_weight(sigma), (sigma**2 + sd**2) / (sigma * sd) ** 2)

    # the sampler feeds the UNet the same way: its timesteps are c_noise, scale_model_input is c_in
    sampler = EDMEulerScheduler.from_config(scheduler.config)
    sampler.set_timesteps(4)
    sigma0 = sampler.sigmas[0]
    torch.testing.assert_close(sampler.timesteps[0], 0.25 * sigma0.log())
    torch.testing.assert_close(sampler.scale_model_input(x, sampler.timesteps[0]), x / (sigma0**2 + sd**2).sqrt())


def test_noise_levels_are_log_normal_and_the_loss_uses_them():
    objective = EDMObjective(build_edm_scheduler(), p_mean=-1.2, p_std=1.2)
    torch.manual_seed(0)
    log_sigma = objective.sample_sigmas(20000, "cpu").log()
    assert abs(log_sigma.mean() - (-1.2)) < 0.05 and abs(log_sigma.std() - 1.2) < 0.05
    # a perfect denoiser (D = clean image) has zero loss; the UNet output that achieves it is (x - c_skip y) / c_out
    torch.manual_seed(1)
    clean = torch.rand(4, 3, 4, 4) * 2 - 1

    class Perfect(torch.nn.Module):
        def forward(self, x_in, t, class_labels=None):
            sigma = (4 * t).exp().reshape(-1, 1, 1, 1)
            noisy = x_in * (sigma**2 + 0.25).sqrt()
            c_skip, c_out = 0.25 / (sigma**2 + 0.25), sigma * 0.5 / (sigma**2 + 0.25).sqrt()
            return type("Out", (), {"sample": (clean - c_skip * noisy) / c_out})()

    assert objective(Perfect(), {"pixel_values": clean}).item() < 1e-6
    assert objective(Recorder(torch.zeros_like(clean)), {"pixel_values": clean}).item() > 0.1


def test_samplers_of_the_other_family_are_refused_in_one_line():
    edm, ddpm = build_edm_scheduler().config, build_noise_scheduler(1000, "linear", "epsilon").config
    assert type(make_scheduler("edm-euler", edm)).__name__ == "EDMEulerScheduler"
    assert type(make_scheduler("edm-dpmsolver++", edm)).__name__ == "EDMDPMSolverMultistepScheduler"
    sde = make_scheduler("edm-sde-dpmsolver++", edm)
    assert type(sde).__name__ == "EDMDPMSolverMultistepScheduler" and sde.config.algorithm_type == "sde-dpmsolver++"
    for name, config, fits in (("ddim", edm, "edm-dpmsolver++, edm-sde-dpmsolver++, edm-euler"),
                               ("edm-euler", ddpm, "ddpm, ddim, dpmsolver++, sde-dpmsolver++")):
        with pytest.raises(UserError, match=re.escape(f" model; use one of {fits}")) as e:
            make_scheduler(name, config)
        assert "\n" not in str(e.value)


def test_edm_settings_are_checked_and_the_grid_sampler_follows_the_objective(tmp_path):
    cfg = build_config({}, {"objective": "edm"})
    assert cfg.run.sample_scheduler == "edm-dpmsolver++" and cfg.objective.sigma_data == 0.5
    assert build_config({}, {}).run.sample_scheduler == "ddim" and build_config({}, {}).objective.objective == "ddpm"
    for flags, message in (({"sample_scheduler": "ddim"}, "is a DDPM sampler"),
                           ({"learn_sigma": True}, "learn_sigma cannot be combined"),
                           ({"snr_gamma": 5.0}, "snr_gamma cannot be combined"),
                           ({"prediction_type": "sample"}, "epsilon or v_prediction")):
        with pytest.raises(UserError, match=message):
            build_config({}, {"objective": "edm", **flags})
    with pytest.raises(UserError, match="samples models trained with --objective edm"):
        build_config({}, {"sample_scheduler": "edm-euler"})


@pytest.mark.slow
def test_resume_is_exact(image_folder, tmp_path):
    flags = dict(objective="edm", max_train_steps=6, checkpointing_steps=3, class_conditional=True,
                 random_flip=True, shuffle_buffer_size=10, train_batch_size=3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *tiny_train_args(image_folder, straight, **flags)]) == 0
    assert resume_from_copy(image_folder, straight, resumed, 3, **flags) == 0
    a, b = straight / "checkpoints" / "checkpoint-6", resumed / "checkpoints" / "checkpoint-6"
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    first = load_file(straight / "checkpoints" / "checkpoint-3" / "model.safetensors")
    assert not all(torch.equal(first[k], weights_a[k]) for k in first)  # it did train on after step 3
    ema_a, ema_b = load_file(a / "ema.safetensors"), load_file(b / "ema.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    root = tmp_path_factory.mktemp("edm-cond")
    data = make_class_folder(root / "data", per_class=6, colours=COLOURS)
    assert main(["train", *tiny_train_args(data, root / "run", class_conditional=True, **TRAIN)]) == 0
    return root / "run" / "pipeline"


def dominant_channels(images) -> list[int]:
    return [int(np.asarray(image, dtype=float).reshape(-1, 3).mean(0).argmax()) for image in images]


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["edm-dpmsolver++", "edm-sde-dpmsolver++", "edm-euler"])
def test_class_conditional_edm_draws_the_requested_colour_with_guidance(conditional, sampler):
    pipe = load_pipeline(str(conditional), torch.device("cpu"))
    assert type(pipe.scheduler).__name__ == "EDMDPMSolverMultistepScheduler"
    pipe.set_progress_bar_config(disable=True)
    labels = [0, 1, 2] * 4
    guided = generate(pipe, 12, steps=12, seed=0, scheduler=sampler, class_labels=labels, guidance_scale=3.0)
    correct = sum(c == CHANNEL_OF_CLASS[y] for c, y in zip(dominant_channels(guided), labels))
    assert correct >= 9, f"{correct}/12 images have their class's colour (chance: 4)"
    unguided = generate(pipe, 12, steps=12, seed=0, scheduler=sampler, class_labels=labels, guidance_scale=0.0)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(guided, unguided))


@pytest.mark.slow
def test_sample_command_takes_edm_samplers_and_refuses_ddpm_ones(conditional, tmp_path, capsys):
    out = tmp_path / "grid.png"
    base = ["sample", "--model", str(conditional), "--num_images", "3", "--steps", "4", "--output", str(out)]
    assert main([*base, "--scheduler", "edm-euler", "--class_labels", "red", "--guidance_scale", "2"]) == 0
    assert out.is_file()
    assert main([*base]) == 0  # the pipeline's own EDM DPM-Solver++
    assert main([*base, "--scheduler", "ddim"]) == 2
    assert "scheduler ddim cannot sample an EDM-trained model" in capsys.readouterr().err


REMOTE_LOAD = """
assert type(pipe).__name__ == "GuidedDDPMPipeline" and type(pipe.scheduler).__name__.startswith("EDM")
pipe.set_progress_bar_config(disable=True)
generators = [torch.Generator("cpu").manual_seed(i) for i in range(3)]
labels = None if pipe.unet.config.num_class_embeds is None else [0, 1, 2]
images = pipe(class_labels=labels, batch_size=3, guidance_scale=2.0, generator=generators, num_inference_steps=6,
              output_type="np").images
np.save(sys.argv[2], images)
"""


@pytest.mark.slow
def test_exported_edm_pipeline_loads_where_flowers_ddpm_cannot_be_imported(conditional, tmp_path):
    theirs = in_plain_diffusers(REMOTE_LOAD, conditional, tmp_path)
    ours = load_pipeline(str(conditional), torch.device("cpu"))
    ours.set_progress_bar_config(disable=True)
    mine = generate(ours, 3, steps=6, seed=0, class_labels=[0, 1, 2], guidance_scale=2.0)
    np.testing.assert_array_equal((theirs * 255).round().astype(np.uint8), np.stack([np.asarray(i) for i in mine]))
    assert dominant_channels(mine) == [2, 1, 0]


@pytest.mark.slow
def test_unconditional_edm_samples_have_the_data_mean_colour(tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=8, colours={"red": (220, 40, 40)})
    assert main(["train", *tiny_train_args(data, tmp_path / "run", **TRAIN)]) == 0
    pipeline = tmp_path / "run" / "pipeline"
    index = json.loads((pipeline / "model_index.json").read_text())
    assert index["_class_name"] == ["guided_ddpm_pipeline", "GuidedDDPMPipeline"]  # DDPMPipeline skips c_in
    pipe = load_pipeline(str(pipeline), torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    samples = np.stack([np.asarray(i, dtype=float) for i in generate(pipe, 8, steps=12, seed=0)])
    # the data: a red disc on a light grey background, resized to 8x8 like the training images
    from PIL import Image
    real = np.stack([np.asarray(Image.open(p).convert("RGB").resize((8, 8), Image.BICUBIC), dtype=float)
                     for p in sorted((data / "red").iterdir())])
    assert np.abs(samples.mean((0, 1, 2)) - real.mean((0, 1, 2))).max() < 25, (samples.mean((0, 1, 2)),
                                                                                 real.mean((0, 1, 2)))
    assert samples.std() > 10  # images, not one flat colour
    theirs = in_plain_diffusers(REMOTE_LOAD, pipeline, tmp_path)
    assert np.abs(theirs.mean((0, 1, 2)) * 255 - real.mean((0, 1, 2))).max() < 25
    assert math.isfinite(float(theirs.sum()))
