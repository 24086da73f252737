"""Classifier-free guidance in a limited interval of noise levels (GuidedDDPMPipeline `guidance_interval`): guided
steps inside it, the conditional model alone outside, the interval saved with the pipeline and honoured by plain
diffusers, and the command line's mistakes as one sentence. A setting of the whole tool: `sample_guidance_interval`
of a training run guides its grids and evaluations and becomes its exports' default, and `evaluate` takes and
records `--guidance_interval` like `sample`."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from flowers_ddpm.cli import main
from flowers_ddpm.config.loading import add_train_arguments, build_config, load_yaml, parse_train_config
from flowers_ddpm.experiments.ablation import AblationSettings, _write_config, variant_settings
from flowers_ddpm.experiments.beds import BedData
from flowers_ddpm.models.classifier import classifier_for_unet
from flowers_ddpm.models.unet import build_noise_scheduler, unet_kwargs
from flowers_ddpm.pipelines.export import save_pipeline
from flowers_ddpm.pipelines.guided import GuidedDDPMPipeline
from flowers_ddpm.pipelines.sampling import load_pipeline
from flowers_ddpm.training.phema import export_reconstructions

from .conftest import in_plain_diffusers, script_main, tiny_train_args

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


def test_a_zero_terminal_snr_schedule_starts_outside_any_finite_interval():
    # diffusers' rescale_betas_zero_snr leaves alpha_bar = 0 at the last timestep: sigma is infinite there, so an
    # interval with a finite upper end does not guide the first step (and nothing divides by zero)
    pipe = tiny_pipeline()
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True,
                                               timestep_spacing="trailing")
    pipe.scheduler.set_timesteps(STEPS)
    assert int(pipe.scheduler.timesteps[0]) == 999 and pipe.noise_level(999) == float("inf")
    assert batch_sizes(pipe, guidance_interval=(0.0, 1e9)) == [2, 4, 4, 4, 4]
    assert batch_sizes(pipe, guidance_interval=(0.0, float("inf"))) == [4] * STEPS
    assert np.isfinite(draw(pipe, guidance_interval=(0.0, 5.0))).all()


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
    unconditional = unconditional_pipeline(tmp_path / "unconditional")
    assert main(["sample", "--model", str(unconditional), "--num_images", "1", "--steps", "2", "--output",
                 str(out), "--guidance_interval", "0", "4"]) == 2
    assert "needs a class-conditional pipeline" in capsys.readouterr().err


def unconditional_pipeline(folder):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(folder))
    return folder


# -- the training setting -----------------------------------------------------------------------------------------
def parse_train(*argv: str):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parse_train_config(parser.parse_args(list(argv)))


def test_the_training_setting_reads_from_flags_and_yaml_and_round_trips(tmp_path):
    cfg = parse_train("--class_conditional", "--sample_guidance_interval", "0.5", "4")
    assert cfg.run.sample_guidance_interval == [0.5, 4.0]
    assert parse_train().run.sample_guidance_interval is None  # the default: guidance at every step
    effective = tmp_path / "effective.yaml"
    cfg.save_yaml(effective)
    assert yaml.safe_load(effective.read_text())["sample_guidance_interval"] == [0.5, 4.0]
    assert parse_train("--config", str(effective)) == cfg
    written = tmp_path / "written.yaml"
    written.write_text("class_conditional: true\nsample_guidance_interval: [0, 3]\n")
    assert parse_train("--config", str(written)).run.sample_guidance_interval == [0.0, 3.0]
    # a flag overrides the file, and `none` unsets it as it does other settings
    assert parse_train("--config", str(written), "--sample_guidance_interval", "1", "2"
                       ).run.sample_guidance_interval == [1.0, 2.0]
    assert parse_train("--config", str(written), "--sample_guidance_interval", "none").run.sample_guidance_interval is None


@pytest.mark.parametrize("flags, message", [
    (["--class_conditional", "--sample_guidance_interval", "5", "1"],
     "sample_guidance_interval takes two noise levels 0 <= LO < HI; got 5 1"),
    (["--class_conditional", "--sample_guidance_interval", "1", "2", "3"],
     "sample_guidance_interval takes two noise levels 0 <= LO < HI; got 1 2 3"),
    (["--class_conditional", "--sample_guidance_interval", "0", "inf"],
     "sample_guidance_interval must be a finite number; got [0.0, inf]"),
    (["--class_conditional", "--sample_guidance_interval", "low", "high"],
     "sample_guidance_interval must be a list of float, got ['low', 'high']"),
    (["--sample_guidance_interval", "0", "4"], "sample_guidance_interval needs class_conditional"),
])
def test_bad_training_intervals_are_one_line_errors_before_any_work(image_folder, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", *tiny_train_args(image_folder, out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


def test_a_training_run_guides_in_its_interval_and_its_exports_keep_it_as_their_default(image_folder, tmp_path):
    """The exported pipeline (and best/, the post-hoc EMA reconstructions, and the pipeline with a classifier
    attached) carry the run's interval and guidance scale, and sample with them when called without."""
    out, interval = tmp_path / "run", [0.0, 1.0]
    args = tiny_train_args(image_folder, out, resolution=8, max_train_steps=2, class_conditional=True,
                           phema_sigma_rel="0.1", eval_steps=2, eval_num_images=4,
                           eval_feature_network="tests.feature_nets:tiny_conv_net",
                           reference_cache_dir=str(tmp_path / "cache"))
    assert main(["train", *args, "--sample_guidance_interval", "0", "1", "--sample_guidance_scale", "2.5"]) == 0
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["guidance_interval"] == interval and index["guidance_scale"] == 2.5
    assert yaml.safe_load((out / "pipeline" / "training_config.yaml").read_text())["sample_guidance_interval"] == interval
    best = out / "best"
    assert json.loads((best / "metrics.json").read_text())["guidance_interval"] == interval  # evaluated with it
    best_index = json.loads((best / "model_index.json").read_text())
    assert best_index["guidance_interval"] == interval and best_index["guidance_scale"] == 2.5

    exported = load_pipeline(str(out / "pipeline"), torch.device("cpu"))
    exported.set_progress_bar_config(disable=True)
    saved = draw(exported, guidance_scale=5.0)  # a strong scale: the interval visibly changes the images
    np.testing.assert_array_equal(saved, draw(exported, guidance_scale=5.0, guidance_interval=(0.0, 1.0)))
    assert np.abs(saved - draw(exported, guidance_scale=5.0, guidance_interval=(0.0, 1e9))).max() > 1e-3

    [reconstruction] = export_reconstructions(out, [0.1])
    assert json.loads((reconstruction / "model_index.json").read_text())["guidance_interval"] == interval
    schedule = {k: exported.scheduler.config[k] for k in ("num_train_timesteps", "beta_schedule")}
    classifier = classifier_for_unet(unet_kwargs("tiny", resolution=8), 8, index["class_names"], schedule)
    classifier.save_pretrained(str(tmp_path / "classifier"))
    assert main(["attach-classifier", "--model", str(out / "pipeline"), "--classifier", str(tmp_path / "classifier"),
                 "--output", str(tmp_path / "with-classifier")]) == 0
    assert json.loads((tmp_path / "with-classifier" / "model_index.json").read_text())["guidance_interval"] == interval


# -- evaluate ---------------------------------------------------------------------------------------------------------
def evaluate(model, data, out, *extra):
    return main(["evaluate", "--model", str(model), "--train_data_dir", str(data), "--num_images", "4",
                 "--batch_size", "2", "--steps", "3", "--feature_network", "tests.feature_nets:tiny_conv_net",
                 "--dinov2_model", "none", "--reference_cache_dir", str(out.parent / "cache"), "--output", str(out),
                 *extra])


def test_evaluate_takes_the_interval_and_records_it(image_folder, tmp_path):
    model = save_pipeline(tiny_pipeline(), tmp_path / "model")
    assert evaluate(model, image_folder, tmp_path / "interval.json", "--guidance_interval", "0", "4") == 0
    assert evaluate(model, image_folder, tmp_path / "every-step.json") == 0
    interval, every_step = (json.loads((tmp_path / name).read_text()) for name in ("interval.json", "every-step.json"))
    assert interval["conditioning"]["guidance_interval"] == [0.0, 4.0]
    assert "guidance_interval" not in every_step["conditioning"]  # guided at every step, recorded as before
    assert interval["results"][0]["fid"] != every_step["results"][0]["fid"]
    assert "at noise levels sigma <= 4" in (tmp_path / "interval.md").read_text()

    # without the flag a pipeline's saved interval is used, and recorded
    saved = save_pipeline(tiny_pipeline(guidance_interval=(0.0, 4.0)), tmp_path / "saved")
    assert evaluate(saved, image_folder, tmp_path / "saved.json") == 0
    report = json.loads((tmp_path / "saved.json").read_text())
    assert report["conditioning"]["guidance_interval"] == [0.0, 4.0]
    assert report["results"][0]["fid"] == interval["results"][0]["fid"]
    # `--guidance_interval 0 inf` guides every step whatever the pipeline saved, and is recorded as every step
    # (metrics.json stays standard JSON: no Infinity)
    assert evaluate(saved, image_folder, tmp_path / "override.json", "--guidance_interval", "0", "inf") == 0
    text = (tmp_path / "override.json").read_text()
    assert "Infinity" not in text and "guidance_interval" not in json.loads(text)["conditioning"]
    assert json.loads(text)["results"][0]["fid"] == every_step["results"][0]["fid"]


def test_evaluate_refuses_an_interval_it_cannot_use_before_any_work(image_folder, tmp_path, capsys):
    model = save_pipeline(tiny_pipeline(), tmp_path / "model")
    assert evaluate(model, image_folder, tmp_path / "x.json", "--guidance_interval", "4", "1") == 2
    assert capsys.readouterr().err.strip() == "error: --guidance_interval takes two noise levels 0 <= LO < HI; got 4 1"
    plain = unconditional_pipeline(tmp_path / "unconditional")
    assert evaluate(plain, image_folder, tmp_path / "y.json", "--guidance_interval", "0", "4") == 2
    assert "--guidance_interval needs a class-conditional pipeline" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before any reference features were computed


# -- the recipe ablation ------------------------------------------------------------------------------------------
def test_the_ablation_trains_its_conditional_variants_with_the_interval_it_scores_with(image_folder, tmp_path):
    bed = BedData("colours", image_folder, image_folder, 16, 3, False)
    settings = AblationSettings(output_dir=tmp_path, guidance_interval=(0.0, 4.5))
    recipe = variant_settings("small-data")
    conditional = build_config(load_yaml(str(_write_config(tmp_path / "class", recipe, bed, settings))), {})
    assert conditional.run.sample_guidance_interval == [0.0, 4.5]  # its grids and export guide as it is scored
    assert conditional.run.sample_guidance_scale == settings.guidance_scale
    unconditional = build_config(load_yaml(str(_write_config(tmp_path / "none", recipe, bed, settings, False))), {})
    assert unconditional.run.sample_guidance_interval is None


def test_the_ablation_refuses_a_reversed_interval_in_one_line(tmp_path, capsys):
    args = ["--output_dir", str(tmp_path / "out"), "--budget_images", "48", "--guidance_interval", "5", "1"]
    assert script_main("recipe_ablation")(args) == 2
    assert "--guidance_interval takes two noise levels 0 <= LO < HI; got 5 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
