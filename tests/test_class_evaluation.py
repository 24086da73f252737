"""Evaluating class-conditional models: `evaluate --class_labels/--guidance_scale`, and evaluation during training
drawing every class (not the "no class" token) with the grid's guidance scale."""

from __future__ import annotations

import json

import pytest
import torch

from flowers_ddpm.cli import main
from flowers_ddpm.config.samplers import DEFAULT_GUIDANCE_SCALE
from flowers_ddpm.models.unet import build_noise_scheduler, build_unet
from flowers_ddpm.pipelines.export import export_pipeline

from .conftest import make_class_folder, tiny_train_args

FEATURE_NET = "tests.feature_nets:tiny_conv_net"
COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_class_folder(tmp_path_factory.mktemp("cond-data") / "images", per_class=3, colours=COLOURS)


@pytest.fixture(scope="module")
def conditional_pipeline(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cond-model") / "pipeline"
    return export_pipeline(build_unet("tiny", 8, num_classes=3), build_noise_scheduler(20, "linear", "epsilon"),
                           path, class_names=list(COLOURS))


def _evaluate(model, data, out, cache, *extra):
    return main(["evaluate", "--model", str(model), "--train_data_dir", str(data), "--num_images", "5",
                 "--batch_size", "2", "--steps", "2", "--feature_network", FEATURE_NET, "--dinov2_model", "none",
                 "--reference_cache_dir", str(cache), "--output", str(out), *extra])


def test_evaluate_draws_the_requested_labels_and_records_them(conditional_pipeline, data, tmp_path):
    out, cache = tmp_path / "labelled.json", tmp_path / "cache"
    assert _evaluate(conditional_pipeline, data, out, cache, "--class_labels", "red", "0",
                     "--guidance_scale", "2.5") == 0
    report = json.loads(out.read_text())
    assert report["conditioning"] == {"class_labels": [2, 0], "class_names": ["red", "blue"], "guidance_scale": 2.5}
    assert report["results"][0]["num_images"] == 5 and report["results"][0]["fid"] > 0
    assert "classes red, blue in turn, guidance scale 2.5" in out.with_suffix(".md").read_text()

    # no labels: every class in turn, with the pipeline's saved guidance scale (what the images were drawn with)
    default, explicit = tmp_path / "default.json", tmp_path / "explicit.json"
    assert _evaluate(conditional_pipeline, data, default, cache) == 0
    assert json.loads(default.read_text())["conditioning"] == {
        "class_labels": [0, 1, 2], "class_names": ["blue", "green", "red"], "guidance_scale": DEFAULT_GUIDANCE_SCALE}
    assert _evaluate(conditional_pipeline, data, explicit, cache, "--guidance_scale", str(DEFAULT_GUIDANCE_SCALE)) == 0
    assert json.loads(explicit.read_text())["results"][0]["fid"] == json.loads(default.read_text())["results"][0]["fid"]


def test_evaluate_rejects_labels_it_cannot_use(conditional_pipeline, data, tmp_path, capsys):
    assert _evaluate(conditional_pipeline, data, tmp_path / "x.json", tmp_path / "cache", "--class_labels",
                     "purple") == 2
    assert "unknown class 'purple'" in capsys.readouterr().err
    plain = export_pipeline(build_unet("tiny", 8), build_noise_scheduler(20, "linear", "epsilon"), tmp_path / "plain")
    assert _evaluate(plain, data, tmp_path / "y.json", tmp_path / "cache", "--guidance_scale", "2") == 2
    assert "--guidance_scale needs a class-conditional pipeline" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before any reference features were computed


def test_training_evaluation_draws_every_class_and_best_keeps_the_class_names(data, tmp_path):
    out = tmp_path / "run"
    args = tiny_train_args(data, out, resolution=8, max_train_steps=2, ddpm_num_steps=20, class_conditional=True,
                           sample_guidance_scale=2.0, eval_steps=2, eval_num_images=4,
                           eval_feature_network=FEATURE_NET, reference_cache_dir=str(tmp_path / "cache"))
    assert main(["train", *args]) == 0
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["class_labels"] == [0, 1, 2] and best["guidance_scale"] == 2.0
    assert json.loads((out / "best" / "model_index.json").read_text())["class_names"] == list(COLOURS)
