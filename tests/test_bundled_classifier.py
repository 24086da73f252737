"""A pipeline folder that carries its noise-aware classifier (attach-classifier): plain diffusers loads it with
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` in a process where flowers_ddpm cannot be
imported, and it draws the same images for the same seed as our pipeline with the classifier passed at call time;
our own loader and `sample` use the bundled classifier by default. Tiny models with random weights: what is checked
is that saving and loading keep the sampling exactly the same."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flowers_ddpm.cli import main
from flowers_ddpm.models.classifier import classifier_for_unet
from flowers_ddpm.models.unet import build_noise_scheduler, build_unet, unet_kwargs
from flowers_ddpm.pipelines.export import export_pipeline
from flowers_ddpm.pipelines.sampling import generate, load_classifier, load_pipeline, with_classifier
from flowers_ddpm.publish.hub import build_model_card

from .conftest import in_plain_diffusers

SCALE, STEPS, LABELS = 20.0, 3, [0, 1]

REMOTE_LOAD = """
pipe.set_progress_bar_config(disable=True)
assert type(pipe.classifier).__name__ == "NoiseAwareClassifier", type(pipe.classifier)
generators = [torch.Generator("cpu").manual_seed(i) for i in range(2)]
images = pipe(class_labels=["blue", "red"], generator=generators, num_inference_steps=%d, output_type="np").images
assert not any(name.startswith("flowers_ddpm") for name in sys.modules if sys.modules[name] is not None)
np.save(sys.argv[2], images)
""" % STEPS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(unconditional pipeline, classifier folder, the pipeline with the classifier attached)."""
    root = tmp_path_factory.mktemp("bundled")
    torch.manual_seed(0)
    scheduler = build_noise_scheduler(1000, "linear", "epsilon")
    model = export_pipeline(build_unet("tiny", 8), scheduler, root / "model", training_config_yaml="seed: 0\n")
    schedule = {k: scheduler.config[k] for k in ("num_train_timesteps", "beta_schedule")}
    classifier = classifier_for_unet(unet_kwargs("tiny", resolution=8), 8, ["blue", "red"], schedule)
    with torch.no_grad():  # a head that separates the classes clearly, so guidance visibly changes the images
        classifier.head.weight.mul_(20)
    classifier.save_pretrained(str(root / "classifier"))
    bundled = root / "bundled"
    assert main(["attach-classifier", "--model", str(model), "--classifier", str(root / "classifier"),
                 "--output", str(bundled), "--classifier_scale", str(SCALE)]) == 0
    return model, root / "classifier", bundled


def reference_images(model, classifier_dir, scale):
    """Our in-process pipeline with the classifier passed at call time."""
    classifier = load_classifier(str(classifier_dir), torch.device("cpu"))
    pipe = with_classifier(load_pipeline(str(model), torch.device("cpu")), classifier)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(2)]
    with torch.no_grad():
        return pipe(class_labels=LABELS, generator=generators, num_inference_steps=STEPS, output_type="np",
                    classifier=classifier, classifier_scale=scale).images


def test_attached_classifier_is_saved_as_a_custom_component(folders):
    model, _, bundled = folders
    index = json.loads((bundled / "model_index.json").read_text())
    assert index["_class_name"] == ["guided_ddpm_pipeline", "GuidedDDPMPipeline"]
    assert index["classifier"] == ["classifier", "NoiseAwareClassifier"] and index["classifier_scale"] == SCALE
    for name in ("guided_ddpm_pipeline.py", "classifier/classifier.py", "classifier/config.json",
                 "classifier/diffusion_pytorch_model.safetensors", "training_config.yaml"):
        assert (bundled / name).is_file(), name
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    card = str(build_model_card(bundled, "user/guided", []))  # the Hub card's usage snippet is the one line
    assert 'from_pretrained("user/guided", trust_remote_code=True)' in card and "class_labels=['blue'] * 4" in card


@pytest.mark.slow
def test_plain_diffusers_loads_the_folder_and_draws_the_same_images(folders, tmp_path):
    model, classifier_dir, bundled = folders
    expected = reference_images(model, classifier_dir, SCALE)
    np.testing.assert_allclose(in_plain_diffusers(REMOTE_LOAD, bundled, tmp_path), expected, atol=1e-6)
    assert np.abs(expected - reference_images(model, classifier_dir, 0.0)).max() > 0.01  # guidance did something


def test_our_loader_and_sample_guide_with_the_bundled_classifier(folders, tmp_path):
    model, classifier_dir, bundled = folders
    pipe = load_pipeline(str(bundled), torch.device("cpu"))
    assert pipe.classifier is not None and pipe.config.classifier_scale == SCALE
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(str(classifier_dir), torch.device("cpu"))
    explicit = with_classifier(load_pipeline(str(model), torch.device("cpu")), classifier)
    for scale in (None, 0.0):
        ours = generate(pipe, 2, STEPS, seed=0, class_labels=LABELS, classifier_scale=scale)
        reference = generate(explicit, 2, STEPS, seed=0, class_labels=LABELS, classifier=classifier,
                             classifier_scale=SCALE if scale is None else scale)
        assert [np.asarray(a).tolist() for a in ours] == [np.asarray(b).tolist() for b in reference], scale
    for flags, scale in (([], SCALE), (["--classifier_scale", "0"], 0.0)):
        out_dir = tmp_path / f"scale{scale}"
        assert main(["sample", "--model", str(bundled), "--num_images", "2", "--steps", str(STEPS), "--class_labels",
                     "blue", "red", "--output", str(out_dir / "grid.png"), "--output_dir", str(out_dir),
                     "--device", "cpu", "--scheduler", "ddpm", *flags]) == 0  # the pipeline's own sampler
        reference = generate(explicit, 2, STEPS, seed=0, class_labels=LABELS, classifier=classifier,
                             classifier_scale=scale)
        written = [np.asarray(Image.open(out_dir / f"{i:05d}.png")) for i in range(2)]
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(written, reference)), flags
