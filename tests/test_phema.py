"""Post-hoc EMA (issue 16, EDM2): power-function EMA profiles, snapshots in the run folder and the running profiles
in checkpoints (resume stays exact), and `ema-reconstruct` synthesising other EMA lengths as pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowers_ddpm.cli import main
from flowers_ddpm.training import phema

from .conftest import resume_from_copy, tiny_train_args


def test_sigma_rel_and_exponent_match_edm2():
    # EDM2: gamma 6.94 <-> sigma_rel 0.10, gamma 16.97 <-> 0.05; sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3))
    for sigma in (0.05, 0.1, 0.2):
        g = phema.sigma_rel_to_gamma(sigma)
        assert np.isclose(((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5, sigma)
    assert abs(phema.sigma_rel_to_gamma(0.1) - 6.94) < 0.01 and abs(phema.sigma_rel_to_gamma(0.05) - 16.97) < 0.01
    assert phema.power_function_beta(0.1, 1) == 0.0  # the first step copies the weights


def _trajectory(steps=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randn(steps, 64, generator=generator), 0)  # a random walk of 64 "weights"


def test_reconstruction_matches_a_profile_that_was_never_stored(tmp_path):
    weights = _trajectory()
    param = torch.nn.Parameter(weights[0].clone())
    stored = phema.PowerFunctionEMA([("w", param)], (0.05, 0.1))
    truth = phema.PowerFunctionEMA([("w", param)], (0.07, 0.15))
    for step, w in enumerate(weights, start=1):
        param.data.copy_(w)
        stored.update([param], step)
        truth.update([param], step)
        if step % 20 == 0:
            stored.save_snapshot(tmp_path, step)
    snapshots = phema.read_snapshots(tmp_path)
    assert [(s, r) for s, r, _ in snapshots[:3]] == [(20, 0.05), (20, 0.1), (40, 0.05)]
    for sigma, exact in zip((0.07, 0.15), truth.profiles):
        got = phema.reconstruct(snapshots, sigma)["w"]
        # the same average up to a small fraction of how far the weights move over the averaging window
        error = (got - exact[0]).abs().max() / (weights[-1] - weights[-100]).abs().mean()
        assert error < 0.01, error  # the nearest stored profile is off by 0.25-1.2 here
    # a stored profile is reproduced almost exactly; a different length gives different weights
    np.testing.assert_allclose(phema.reconstruct(snapshots, 0.1)["w"], stored.profiles[1][0], atol=1e-3)
    assert (phema.reconstruct(snapshots, 0.07)["w"] - phema.reconstruct(snapshots, 0.15)["w"]).abs().max() > 0.1


def test_phema_settings_are_checked():
    from flowers_ddpm.config.loading import build_config
    from flowers_ddpm.errors import UserError

    assert build_config({}, {"phema_sigma_rel": "0.05,0.1"}).ema.phema_sigma_rel == "0.05,0.1"
    for bad in ("0.05,x", "0.5"):
        with pytest.raises(UserError, match="phema_sigma_rel"):
            build_config({}, {"phema_sigma_rel": bad})


@pytest.mark.slow
def test_training_snapshots_resume_exactly_and_reconstruct_to_pipelines(image_folder, tmp_path, capsys):
    flags = dict(max_train_steps=6, checkpointing_steps=3, phema_sigma_rel="0.05,0.1", phema_snapshot_steps=2,
                 train_batch_size=3, shuffle_buffer_size=10)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *tiny_train_args(image_folder, straight, **flags)]) == 0
    assert sorted(p.name for p in (straight / "phema").iterdir()) == [
        "step-0000002.safetensors", "step-0000004.safetensors", "step-0000006.safetensors"]
    assert (straight / "checkpoints" / "checkpoint-3" / "phema.safetensors").is_file()

    assert resume_from_copy(image_folder, straight, resumed, 3, **flags) == 0
    for name in ("step-0000004.safetensors", "step-0000006.safetensors"):
        a, b = load_file(straight / "phema" / name), load_file(resumed / "phema" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert main(["ema-reconstruct", "--run_dir", str(straight), "--sigma_rel", "0.08", "0.1"]) == 0
    out = straight / "ema-reconstruct"
    from flowers_ddpm.pipelines.sampling import generate, load_pipeline

    pipe = load_pipeline(str(out / "sigma_rel-0.1"), torch.device("cpu"))
    final = load_file(straight / "phema" / "step-0000006.safetensors")
    for name, param in pipe.unet.named_parameters():
        torch.testing.assert_close(param.detach(), final[f"0.1/{name}"], atol=2e-3, rtol=0)
    pipe.set_progress_bar_config(disable=True)
    assert len(generate(pipe, 2, steps=2, seed=0)) == 2
    assert (out / "sigma_rel-0.08" / "training_config.yaml").is_file()

    # the best EMA length by FID, in one command: `evaluate` ranks the reconstructed pipelines
    ranking = tmp_path / "ema-ranking.json"
    models = [str(out / "sigma_rel-0.08"), str(out / "sigma_rel-0.1")]
    assert main(["evaluate", "--model", *models, "--num_images", "4", "--batch_size", "4", "--steps", "2",
                 "--feature_network", "tests.feature_nets:tiny_conv_net", "--dinov2_model", "none",
                 "--no-precision_recall", "--reference_cache_dir", str(tmp_path / "cache"),
                 "--output", str(ranking)]) == 0
    own = {m: json.loads((Path(m) / "metrics.json").read_text())["results"][0]["fid"] for m in models}
    assert len(set(own.values())) == 2  # different EMA lengths, different samples
    assert json.loads(ranking.read_text())["best"] == min(own, key=own.get)
    assert main(["ema-reconstruct", "--run_dir", str(tmp_path / "none"), "--sigma_rel", "0.1"]) == 2
