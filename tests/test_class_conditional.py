"""Class-conditional training with classifier-free guidance and learned variances, end to end on a generated
folder where each class is a colour; the exported GuidedDDPMPipeline loads in plain diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowers_ddpm.cli import main
from flowers_ddpm.models.unet import build_noise_scheduler, build_unet
from flowers_ddpm.pipelines.export import export_pipeline
from flowers_ddpm.pipelines.sampling import generate, load_pipeline

from .conftest import make_class_folder, tiny_train_args

COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}  # sub-folder order = label order
CHANNEL_OF_CLASS = {0: 2, 1: 1, 2: 0}  # the dominant RGB channel of each class's colour


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    data = make_class_folder(root / "data", per_class=6, colours=COLOURS)
    # 240 steps: 11-12 of the 12 images right over training seeds 0-5 (120 steps: 4-12 of 12)
    args = tiny_train_args(data, root / "run", resolution=8, max_train_steps=240, train_batch_size=8,
                           learning_rate=3e-3, lr_warmup_steps=10, lr_scheduler="constant_with_warmup",
                           use_ema=False, checkpointing_steps=1000, class_conditional=True, learn_sigma=True,
                           eval_batch_size=3)
    assert main(["train", *args]) == 0
    return root / "run" / "pipeline"


def dominant_channels(images) -> list[int]:
    return [int(np.asarray(image, dtype=float).reshape(-1, 3).mean(0).argmax()) for image in images]


@pytest.mark.slow
def test_labels_steer_the_colour_and_guidance_changes_the_output(trained):
    pipe = load_pipeline(str(trained), torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    labels = [0, 1, 2] * 4
    guided = generate(pipe, 12, steps=10, seed=0, scheduler="ddim", class_labels=labels, guidance_scale=3.0)
    correct = sum(c == CHANNEL_OF_CLASS[y] for c, y in zip(dominant_channels(guided), labels))
    assert correct >= 8, f"{correct}/12 images have their class's colour (chance: 4)"
    unguided = generate(pipe, 12, steps=10, seed=0, scheduler="ddim", class_labels=labels, guidance_scale=0.0)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(guided, unguided))


def test_class_conditional_exports_save_the_measured_guidance_scale_as_their_default(tmp_path):
    """1.5 (docs/sampling.md): what sample, evaluate, the demo and a plain diffusers call use when given none;
    an unconditional learned-variance export keeps 1, and attach-classifier keeps the model's scale."""
    from flowers_ddpm.config.samplers import DEFAULT_GUIDANCE_SCALE

    scheduler = build_noise_scheduler(1000, "linear", "epsilon", learn_sigma=True)
    conditional = export_pipeline(build_unet("tiny", 16, num_classes=3, learn_sigma=True), scheduler,
                                  tmp_path / "conditional", class_names=["blue", "green", "red"])
    unconditional = export_pipeline(build_unet("tiny", 16, learn_sigma=True), scheduler, tmp_path / "unconditional")
    assert json.loads((conditional / "model_index.json").read_text())["guidance_scale"] == DEFAULT_GUIDANCE_SCALE
    assert load_pipeline(str(conditional), torch.device("cpu")).config.guidance_scale == DEFAULT_GUIDANCE_SCALE
    assert json.loads((unconditional / "model_index.json").read_text())["guidance_scale"] == 1.0


@pytest.mark.slow
def test_exported_pipeline_reloads_in_plain_diffusers_and_reproduces_the_images(trained):
    from diffusers import DiffusionPipeline

    index = json.loads((trained / "model_index.json").read_text())
    assert index["_class_name"] == ["guided_ddpm_pipeline", "GuidedDDPMPipeline"]
    assert index["class_names"] == ["blue", "green", "red"]
    assert json.loads((trained / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == "learned_range"

    # the documented line; the pipeline class comes from the file shipped in the folder
    pipe = DiffusionPipeline.from_pretrained(str(trained), trust_remote_code=True)
    assert type(pipe).__name__ == "GuidedDDPMPipeline" and type(pipe).__module__ != "flowers_ddpm.pipelines.guided"
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    theirs = pipe(class_labels=["red", 0], guidance_scale=3.0, generator=generators, num_inference_steps=5,
                  output_type="np").images

    ours = load_pipeline(str(trained), torch.device("cpu"))
    ours.set_progress_bar_config(disable=True)
    mine = generate(ours, 2, steps=5, seed=0, class_labels=[2, 0], guidance_scale=3.0)  # DDPM, learned variances
    np.testing.assert_array_equal((theirs * 255).round().astype(np.uint8), np.stack([np.asarray(i) for i in mine]))


@pytest.mark.slow
def test_sample_command_takes_class_names_and_rejects_wrong_labels(trained, tmp_path):
    out = tmp_path / "grid.png"
    base = ["sample", "--model", str(trained), "--num_images", "2", "--steps", "2", "--output", str(out)]
    assert main([*base, "--class_labels", "red", "Blue", "--guidance_scale", "2"]) == 0 and out.is_file()
    assert main([*base, "--class_labels", "purple"]) == 2
    assert main([*base, "--class_labels", "3"]) == 2  # out of range
    assert main([*base, "--guidance_scale", "2"]) == 2  # guidance without labels

    unconditional = export_pipeline(build_unet("tiny", 8), build_noise_scheduler(1000, "linear", "epsilon"),
                                    tmp_path / "plain")
    assert json.loads((unconditional / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert main(["sample", "--model", str(unconditional), "--class_labels", "0", "--steps", "2",
                 "--output", str(tmp_path / "x.png")]) == 2


def test_class_conditional_needs_labelled_data(image_folder, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((image_folder / "red").iterdir())[:4]:
        (flat / path.name).write_bytes(path.read_bytes())
    assert main(["train", *tiny_train_args(flat, tmp_path / "run", class_conditional=True)]) == 2
    assert "class_conditional needs class labels" in capsys.readouterr().err
