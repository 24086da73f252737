"""Classifier-free guidance in a limited interval of noise levels (GuidedDDPMPipeline `guidance_interval`): guided
steps inside it, the conditional model alone outside, the interval saved with the pipeline and honoured by plain
diffusers, and the command line's mistakes as one sentence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from flowers_ddpm.cli import main
from flowers_ddpm.models.unet import build_noise_scheduler
from flowers_ddpm.pipelines.export import save_pipeline
from flowers_ddpm.pipelines.guided import GuidedDDPMPipeline
from flowers_ddpm.pipelines.sampling import load_pipeline

from .conftest import in_plain_diffusers

STEPS = 5
LABELS = [0, 1]


def tiny_pipeline(guidance_interval=None) -> GuidedDDPMPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=3)
    with torch.no_grad():  # a random class embedding large enough that guidance visibly changes the images
        unet.class_embedding.weight.mul_(20)
    scheduler = build_noise_scheduler(1000, "squaredcos_cap_v2", "v_prediction")
    pipe = GuidedDDPMPipeline(unet=unet.eval(), scheduler=scheduler, guidance_scale=3.0,
                              guidance_interval=guidance_interval)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, **kwargs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(i) for i in range(len(LABELS))]
    return pipe(class_labels=LABELS, generator=generators, num_inference_steps=STEPS, output_type="np",
                **kwargs).images


def batch_sizes(pipe, **kwargs) -> list[int]:
    """The batch size of every UNet call of one draw (2 x images where guided: conditional and "no class")."""
    sizes = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    try:
        draw(pipe, **kwargs)
    finally:
        handle.remove()
    return sizes


def test_guidance_runs_only_at_noise_levels_inside_the_interval():
    pipe = tiny_pipeline()
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = [pipe.noise_level(t) for t in pipe.scheduler.timesteps]  # 999, 799, ...: falling noise levels
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[0] > 1000 and sigmas[-1] < 1
    hi = (sigmas[1] + sigmas[2]) / 2  # the first two steps lie above the interval, the other three inside it
    assert batch_sizes(pipe, guidance_interval=(0.0, hi)) == [2, 2, 4, 4, 4]
    assert batch_sizes(pipe) == [4] * STEPS

    every_step, interval, none = draw(pipe), draw(pipe, guidance_interval=(0.0, hi)), draw(pipe, guidance_scale=1.0)
    np.testing.assert_array_equal(draw(pipe, guidance_interval=(0.0, 1e9)), every_step)
    np.testing.assert_array_equal(draw(pipe, guidance_interval=(1e8, 1e9)), none)
    assert np.abs(interval - every_step).max() > 0.01 and np.abs(interval - none).max() > 0.01


def test_the_interval_is_saved_and_plain_diffusers_samples_with_it(tmp_path):
    pipe = tiny_pipeline(guidance_interval=(0.0, 5.0))
    folder = save_pipeline(pipe, tmp_path / "pipeline")
    assert json.loads((folder / "model_index.json").read_text())["guidance_interval"] == [0.0, 5.0]
    ours = load_pipeline(str(folder), torch.device("cpu"))
    assert list(ours.config.guidance_interval) == [0.0, 5.0]
    ours.set_progress_bar_config(disable=True)
    expected = draw(ours)
    np.testing.assert_array_equal(expected, draw(pipe, guidance_interval=(0.0, 5.0)))
    assert np.abs(expected - draw(pipe, guidance_interval=(0.0, 1e9))).max() > 0.01  # the saved one was used
    script = f"""
generators = [torch.Generator().manual_seed(i) for i in range({len(LABELS)})]
pipe.set_progress_bar_config(disable=True)
images = pipe(class_labels={LABELS}, generator=generators, num_inference_steps={STEPS}, output_type="np").images
np.save(sys.argv[2], images)
"""
    np.testing.assert_allclose(in_plain_diffusers(script, folder, tmp_path), expected, atol=1e-6)


def test_pipelines_saved_before_the_interval_guide_every_step(tmp_path):
    folder = save_pipeline(tiny_pipeline(), tmp_path / "pipeline")
    index = json.loads((folder / "model_index.json").read_text())
    del index["guidance_interval"]
    (folder / "model_index.json").write_text(json.dumps(index))
    old = load_pipeline(str(folder), torch.device("cpu"))
    old.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(draw(old), draw(tiny_pipeline()))


@pytest.mark.parametrize("interval", [(5.0, 1.0), (-1.0, 2.0)])
def test_a_reversed_or_negative_interval_is_refused(interval):
    with pytest.raises(ValueError, match="guidance_interval must be two noise levels"):
        draw(tiny_pipeline(), guidance_interval=interval)


def test_sample_command_takes_the_interval_and_refuses_it_where_it_cannot_apply(tmp_path, capsys):
    conditional = save_pipeline(tiny_pipeline(), tmp_path / "conditional")
    out = tmp_path / "grid.png"
    base = ["sample", "--model", str(conditional), "--num_images", "2", "--steps", "3", "--output", str(out)]
    assert main([*base, "--guidance_interval", "0", "4"]) == 0 and out.is_file()
    capsys.readouterr()
    assert main([*base, "--guidance_interval", "4", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --guidance_interval takes two noise levels 0 <= LO < HI; got 4 1"
    unconditional = tmp_path / "unconditional"
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(unconditional))
    assert main(["sample", "--model", str(unconditional), "--num_images", "1", "--steps", "2", "--output",
                 str(out), "--guidance_interval", "0", "4"]) == 2
    assert "needs a class-conditional pipeline" in capsys.readouterr().err
