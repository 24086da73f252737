"""Metrics, reference cache, the evaluate command (one and two processes) and evaluation during training.

The Inception network cannot be downloaded offline, so a small real conv net (tests/feature_nets.py) replaces it
through the documented `--feature_network` hook, and FD-DINOv2 runs a tiny randomly initialised transformers
Dinov2Model saved to disk.
"""

from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from flowers_ddpm.cli import main
from flowers_ddpm.config.sections import DataSettings
from flowers_ddpm.evaluation.metrics import compute_metrics, frechet_distance, kernel_distance, precision_recall
from flowers_ddpm.evaluation.reference import load_or_compute_reference
from flowers_ddpm.models.unet import build_edm_scheduler, build_noise_scheduler, build_unet
from flowers_ddpm.pipelines.export import export_pipeline

from .conftest import REPO, free_port, run_command, tiny_train_args
from .feature_nets import tiny_conv_net

FEATURE_NET = "tests.feature_nets:tiny_conv_net"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    torch.manual_seed(0)  # 50 training timesteps keep even the DDPM full chain short
    path = tmp_path_factory.mktemp("model") / "pipeline"
    export_pipeline(build_unet("tiny", 16), build_noise_scheduler(50, "linear", "epsilon"), path)
    return path


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(config).save_pretrained(path)
    return path


def disc_images(count: int, seed: int = 0) -> torch.Tensor:
    """uint8 (N, 3, 24, 24): discs of random colour, size and position on a light background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:24, :24]
    images = np.full((count, 24, 24, 3), 230, dtype=np.uint8)
    for image in images:
        cy, cx, r = rng.integers(6, 18), rng.integers(6, 18), rng.integers(3, 7)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.integers(0, 256, 3)
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def test_metrics_are_zero_for_a_set_against_itself_and_grow_with_the_shift():
    net = tiny_conv_net()
    images = disc_images(128)
    real = net(images)
    shifted = [net((images.int() + shift).clamp(0, 255).to(torch.uint8)) for shift in (10, 40, 90)]
    noise = net(torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))

    itself = compute_metrics(real, real, kid_subset_size=64)
    fids = [frechet_distance(real["features"], s["features"]) for s in shifted]
    kids = [kernel_distance(real["features"], s["features"], subset_size=64)[0] for s in shifted]
    fid_noise = frechet_distance(real["features"], noise["features"])
    assert abs(itself["fid"]) < 1e-6 * fid_noise
    assert abs(itself["kid_mean"]) < 0.05 * kids[0]
    assert itself["precision"] == itself["recall"] == 1.0
    assert 0 < fids[0] < fids[1] < fids[2] < fid_noise
    assert 0 < kids[0] < kids[1] < kids[2]
    assert math.isfinite(itself["is_mean"]) and itself["is_mean"] >= 1.0


def test_precision_recall_on_a_hand_checked_case():
    # k=3 radii of the real points 0..4: 3, 2, 2, 2, 3 -> every fake point in [-3, 7] is inside; 10 is not.
    # Fake radii: 0.3, 0.2, 0.2, 0.3 (the cluster) and 7.4 (the point at 10, covering 3 and 4); 2.8 covers 3 too.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    fake = torch.tensor([[2.5], [2.6], [2.7], [2.8], [10.0]])
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == pytest.approx(4 / 5)
    assert recall == pytest.approx(2 / 5)


def _reference(accelerator, data, cache, network, **changes):
    calls = []
    hook = network.register_forward_hook(lambda *args: calls.append(1))
    data_settings = DataSettings(**{"train_data_dir": str(data), "resolution": 16, "center_crop": True, **changes})
    features = load_or_compute_reference(accelerator, data_settings, {"inception": network}, str(cache), batch_size=8)
    hook.remove()
    return features["inception"], len(calls)


def test_reference_cache_is_reused_and_invalidated_by_any_setting(image_folder, tmp_path):
    from accelerate import Accelerator

    accelerator, cache, data = Accelerator(cpu=True), tmp_path / "cache", tmp_path / "images"
    shutil.copytree(image_folder, data)
    net = tiny_conv_net()
    first, calls = _reference(accelerator, data, cache, net)
    assert calls > 0 and first["features"].shape == (24, 64) and first["logits"].shape == (24, 10)
    again, calls = _reference(accelerator, data, cache, net)
    assert calls == 0 and torch.equal(again["features"], first["features"])

    assert _reference(accelerator, data, cache, net, resolution=8)[1] > 0
    assert _reference(accelerator, data, cache, net, center_crop=False)[1] > 0
    assert _reference(accelerator, data, cache, net, resolution=8)[1] == 0  # both entries are kept
    other = tiny_conv_net()
    with torch.no_grad():
        other.head.bias.add_(1.0)  # other weights, other features
    assert _reference(accelerator, data, cache, other)[1] > 0
    Image.new("RGB", (20, 20), (0, 200, 0)).save(data / "red" / "new.png")
    changed, calls = _reference(accelerator, data, cache, net)
    assert calls > 0 and len(changed["features"]) == 25
    assert len(list(cache.glob("*.safetensors"))) == 5


def evaluate_args(pipeline_dir, data, out, cache, *extra):
    return ["--model", str(pipeline_dir), "--train_data_dir", str(data), "--num_images", "4", "--batch_size", "4",
            "--feature_network", FEATURE_NET, "--reference_cache_dir", str(cache), "--output", str(out), *extra]


@pytest.fixture(scope="module")
def compared(pipeline_dir, dinov2_dir, image_folder, tmp_path_factory):
    """One single-process `evaluate --compare_schedulers` run: (report path, cache dir, printed output)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("compare")
    out, cache = root / "report" / "metrics.json", root / "cache"
    args = evaluate_args(pipeline_dir, image_folder, out, cache, "--dinov2_model", str(dinov2_dir),
                         "--compare_schedulers")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["evaluate", *args]) == 0
    return out, cache, printed.getvalue()


def test_evaluate_compares_schedulers_and_writes_json_markdown_and_pipeline_metrics(
        compared, pipeline_dir, image_folder):
    out, cache, printed = compared
    report = json.loads(out.read_text())
    rows = report["results"]
    # the model has 50 training timesteps, so "DDPM-1000" and DDIM-50 are its full 50-step chain
    assert [(r["scheduler"], r["steps"]) for r in rows] == [
        ("ddpm", 50), ("ddim", 50), ("ddim", 25), ("dpmsolver++", 20), ("dpmsolver++", 10)]
    for row in rows:
        assert row["num_images"] == 4 and row["images_per_sec"] > 0
        assert all(math.isfinite(row[k]) for k in ("fid", "kid_mean", "is_mean", "fd_dinov2"))
        assert row["fid"] > 0 and row["fd_dinov2"] > 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    assert report["reference"] == {"description": f"local folder {image_folder.name}", "dataset_name": None,
                                   "split": "all", "resolution": 16, "center_crop": True, "num_images": 24}
    assert report["model"] == f"{pipeline_dir.parent.name}/pipeline" and report["feature_networks"]["inception"] == "tiny-conv-net"
    table = out.with_suffix(".md").read_text()
    assert "| sampler | steps | FID | KID | IS | precision | recall | FD-DINOv2 | images/s |" in table
    assert "in features of `tiny-conv-net` (a custom feature network): not comparable with papers" in table
    for text in (out.read_text(), table, (pipeline_dir / "metrics.md").read_text()):
        assert str(image_folder.parent) not in text and str(pipeline_dir.parent) not in text  # no local paths
    assert table.count("| dpmsolver++ |") == 2 and table.count("\n| d") == 5
    assert json.loads((pipeline_dir / "metrics.json").read_text()) == report  # travels with the model
    assert "| ddim | 25 |" in printed
    assert len(list(cache.glob("*.safetensors"))) == 2  # one entry per feature network


@pytest.mark.slow
def test_two_processes_give_the_single_process_metrics(compared, pipeline_dir, image_folder, tmp_path):
    single_out, single_cache, _ = compared
    one = json.loads(single_out.read_text())["results"][2]  # DDIM-25
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(free_port()), str(REPO / "scripts" / "evaluate.py")]
    out = tmp_path / "two.json"
    args = evaluate_args(pipeline_dir, image_folder, out, tmp_path / "cache", "--scheduler", "ddim", "--steps", "25",
                         "--dinov2_model", "none")
    result = run_command(launch + args, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(out.read_text())["results"][0]
    assert (two["scheduler"], two["steps"]) == ("ddim", 25)
    for key in ("fid", "kid_mean", "is_mean", "precision", "recall"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-9), key
    # the reference, computed by two processes on two shards, is the same cache entry
    (entry,) = (tmp_path / "cache").glob("*.safetensors")
    assert (single_cache / entry.name).is_file()


@pytest.mark.parametrize("extra, message", [
    ((), f"the FID Inception weights {INCEPTION_FILE} are needed"),
    (("--inception_weights", "missing.pth"), "inception_weights missing.pth does not exist"),
])
def test_missing_inception_weights_offline_is_one_clear_error(pipeline_dir, tmp_path, monkeypatch, capsys,
                                                               extra, message):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache; HF_HUB_OFFLINE=1 (conftest)
    code = main(["evaluate", "--model", str(pipeline_dir), "--num_images", "4", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "--inception_weights PATH" in err and INCEPTION_FILE in err


def test_the_card_of_an_evaluated_pipeline_has_its_metrics_labelled_and_no_local_paths(compared, pipeline_dir,
                                                                                        image_folder, tmp_path):
    report = compared[0]  # the comparison's report; later tests of this module evaluate pipeline_dir again
    for suffix in (".json", ".md"):
        shutil.copyfile(report.with_suffix(suffix), pipeline_dir / f"metrics{suffix}")
    staging = tmp_path / "staging"
    assert main(["push", "--model", str(pipeline_dir), "--repo_id", "someone/tiny", "--dry_run",
                 "--staging_dir", str(staging)]) == 0
    card = (staging / "README.md").read_text()
    metrics = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"]
    fids = [m for result in metrics for m in result["metrics"] if m["type"] == "fid"]
    assert len(fids) == 5 and all(m["config"] == "tiny-conv-net" for m in fids)  # one per compared sampler
    assert fids[1]["name"] == "FID in features of tiny-conv-net, not comparable with papers (ddim, 50 steps)"
    assert "**FID in features of tiny-conv-net: not comparable with papers**" in card
    assert "| sampler | steps | FID | KID | IS | precision | recall | FD-DINOv2 | images/s |" in card
    assert "```json" not in card
    for path in staging.rglob("*"):
        if path.suffix in (".md", ".json", ".yaml"):
            text = path.read_text()
            assert str(image_folder.parent) not in text and str(pipeline_dir.parent) not in text, path


def test_offline_evaluate_names_every_missing_download_at_once(pipeline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache; HF_HUB_OFFLINE=1 (conftest)
    code = main(["evaluate", "--model", str(pipeline_dir), "--num_images", "4",
                 "--dinov2_model", "someone/dinov2-not-downloaded"])
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()  # one line, before the pipeline is even loaded
    assert code == 2 and line.startswith("error: evaluate needs 2 things it cannot load: (1)")
    assert INCEPTION_FILE in err and "someone/dinov2-not-downloaded" in err and "--dinov2_model none" in err


def test_metrics_and_evaluate_raise_no_user_warnings(pipeline_dir, image_folder, tmp_path):
    import warnings

    real, fake = disc_images(12), disc_images(12, seed=1)
    net = tiny_conv_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        compute_metrics(net(real), net(fake), kid_subset_size=6)
    args = evaluate_args(pipeline_dir, image_folder, tmp_path / "m.json", tmp_path / "cache", "--steps", "2",
                         "--dinov2_model", "none")
    args[args.index(FEATURE_NET)] = "tests.feature_nets:grad_tracking_net"  # a user's network without no_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main(["evaluate", *args]) == 0
    # without --scheduler: sample's default sampler for a DDPM-trained model
    assert json.loads((tmp_path / "m.json").read_text())["results"][0]["scheduler"] == "ddim"


def test_an_edm_trained_pipeline_is_evaluated_with_an_edm_sampler_by_default(image_folder, tmp_path, capsys):
    torch.manual_seed(0)
    edm = export_pipeline(build_unet("tiny", 16), build_edm_scheduler(), tmp_path / "edm")
    out, cache = tmp_path / "m.json", tmp_path / "cache"
    # a sampler of the other family: one line, before the reference set is read
    assert main(["evaluate", *evaluate_args(edm, image_folder, out, cache, "--scheduler", "ddim",
                                            "--dinov2_model", "none")]) == 2
    assert "scheduler ddim cannot sample an EDM-trained model" in capsys.readouterr().err
    assert not cache.exists() and not out.exists()
    assert main(["evaluate", *evaluate_args(edm, image_folder, out, cache, "--steps", "2", "--dinov2_model", "none",
                                            "--no-precision_recall")]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert (row["scheduler"], row["steps"]) == ("edm-dpmsolver++", 2) and math.isfinite(row["fid"])


def test_training_evaluates_every_n_steps_and_keeps_the_best_pipeline(image_folder, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    args = tiny_train_args(image_folder, out, eval_steps=3, eval_num_images=4, eval_feature_network=FEATURE_NET,
                           reference_cache_dir=str(tmp_path / "cache"), logger="tensorboard")
    assert main(["train", *args]) == 0
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["step"] in (3, 6) and best["num_images"] == 4 and best["fid"] > 0
    DiffusionPipeline.from_pretrained(out / "best")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    fids = [e.value for e in events.Scalars("eval/fid")]
    assert [e.step for e in events.Scalars("eval/fid")] == [3, 6] and min(fids) == pytest.approx(best["fid"])


def test_several_models_are_ranked_by_fid_on_the_same_seeds(pipeline_dir, image_folder, tmp_path, capsys):
    """`evaluate --model A B` (e.g. the EMA lengths `ema-reconstruct` wrote): every model on the same seeds and
    reference, the lowest FID named best, each FID the one `evaluate` gives that model alone."""
    from diffusers import UNet2DModel

    noisy = tmp_path / "noisy"
    shutil.copytree(pipeline_dir, noisy)
    unet = UNet2DModel.from_pretrained(noisy / "unet")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    unet.save_pretrained(noisy / "unet")
    out, cache = tmp_path / "ranking.json", tmp_path / "cache"
    args = evaluate_args(pipeline_dir, image_folder, out, cache, "--steps", "2", "--dinov2_model", "none",
                         "--no-precision_recall")
    args[args.index("--model") + 1:args.index("--model") + 2] = [str(noisy), str(pipeline_dir)]
    assert main(["evaluate", *args]) == 0
    ranking = json.loads(out.read_text())
    fids = {row["model"]: row["fid"] for row in ranking["ranking"]}
    assert set(fids) == {str(noisy), str(pipeline_dir)} and len(set(fids.values())) == 2
    assert ranking["best"] == min(fids, key=fids.get) == ranking["ranking"][0]["model"]
    table = out.with_suffix(".md").read_text()
    assert table.startswith(f"2 models ranked by FID against local folder {image_folder.name}; best: "
                            f"`{ranking['best']}`")
    assert "| model | sampler | steps | FID | KID | IS | images/s |" in table
    assert f"best by FID: {ranking['best']}" in capsys.readouterr().out
    # each pipeline keeps its own metrics, the same as evaluating it alone gives
    assert json.loads((noisy / "metrics.json").read_text())["results"][0]["fid"] == fids[str(noisy)]
    single = tmp_path / "single.json"
    args = evaluate_args(noisy, image_folder, single, cache, "--steps", "2", "--dinov2_model", "none",
                         "--no-precision_recall")
    assert main(["evaluate", *args]) == 0
    assert json.loads(single.read_text())["results"][0]["fid"] == pytest.approx(fids[str(noisy)], rel=1e-6)
    assert main(["evaluate", "--model", str(noisy), str(noisy), "--num_images", "4"]) == 2
    assert main(["evaluate", "--model", str(noisy), str(tmp_path), "--num_images", "4"]) == 2
    assert "is not a pipeline folder (no model_index.json)" in capsys.readouterr().err
