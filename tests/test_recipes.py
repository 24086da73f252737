"""The small-data recipe preset and the recipe ablation script (issue 8); the measured numbers live in
docs/recipes.md."""

from __future__ import annotations

import csv
import itertools
import json
import re
import sys

import pytest
import yaml
from diffusers import DDPMScheduler, UNet2DModel

from flowers_ddpm.config.loading import build_config, load_yaml
from flowers_ddpm.config.recipes import recipe_settings
from flowers_ddpm.config.validation import validate
from flowers_ddpm.errors import UserError
from flowers_ddpm.experiments import ablation
from flowers_ddpm.experiments.beds import BedData
from flowers_ddpm.models.unet import PRESETS

from .conftest import REPO, main, make_npz, run_command, script_main, tiny_train_args


def test_recipe_fills_only_unset_settings():
    cfg = build_config({"recipe": "small-data", "max_train_steps": 5, "model_preset": "tiny",
                        "prediction_type": "epsilon"}, {"learning_rate": "3e-4"})
    recipe = recipe_settings("small-data", "tiny")
    assert cfg.model.prediction_type == "epsilon"  # YAML beats the recipe
    assert cfg.optim.learning_rate == 3e-4  # flags beat the recipe
    assert cfg.ema.ema_max_decay == recipe["ema_max_decay"] and cfg.ema.ema_power == recipe["ema_power"]
    assert cfg.model.ddpm_beta_schedule == recipe["ddpm_beta_schedule"]
    plain = build_config({"max_train_steps": 5}, {})
    assert (plain.model.prediction_type, plain.ema.ema_power) == ("epsilon", 0.75)  # no recipe: diffusers' defaults


def test_photos_recipe_adds_its_betas_schedule_and_scale_shift_under_the_users_settings(tmp_path):
    cfg = build_config({"recipe": "small-data-photos", "model_preset": "small",
                        "unet_config": {"block_out_channels": [32, 64, 96]}}, {"adam_beta2": "0.999"})
    assert (cfg.optim.adam_beta1, cfg.optim.adam_beta2) == (0.9, 0.999)  # the flag beats the recipe
    assert cfg.model.ddpm_beta_schedule == "squaredcos_cap_v2" and cfg.optim.learning_rate == 1e-3
    # the recipe's UNet setting joins the user's own UNet settings instead of replacing them
    assert cfg.model.unet_config == {"resnet_time_scale_shift": "scale_shift", "block_out_channels": [32, 64, 96]}
    mine = build_config({"recipe": "small-data-photos", "unet_config": {"resnet_time_scale_shift": "default"}}, {})
    assert mine.model.unet_config == {"resnet_time_scale_shift": "default"}
    # a UNet config file describes the whole architecture: the recipe leaves the UNet alone
    named = build_config({"recipe": "small-data-photos", "model_config_name_or_path": str(tmp_path)}, {})
    assert named.model.unet_config is None and named.model.ddpm_beta_schedule == "squaredcos_cap_v2"
    assert build_config({"recipe": "small-data"}, {}).model.unet_config is None


def test_photos_recipe_guides_class_conditional_runs_only_at_low_noise():
    photos = {"recipe": "small-data-photos", "class_conditional": True}
    assert build_config(photos, {}).run.sample_guidance_interval == [0.0, 4.5]
    assert build_config(photos, {"sample_guidance_interval": ["0", "8"]}).run.sample_guidance_interval == [0.0, 8.0]
    assert build_config({**photos, "sample_guidance_interval": None}, {}).run.sample_guidance_interval is None
    # an unconditional run has no guidance to limit (and the setting would be refused there)
    assert build_config({"recipe": "small-data-photos"}, {}).run.sample_guidance_interval is None
    assert build_config({**photos, "class_conditional": False}, {}).run.sample_guidance_interval is None
    assert build_config({"recipe": "small-data", "class_conditional": True}, {}).run.sample_guidance_interval is None


def test_photos_recipe_learns_its_loss_weights_unconditionally_unless_another_weighting_is_chosen():
    photos = {"recipe": "small-data-photos"}
    assert build_config(photos, {}).objective.learned_loss_weights is True
    assert build_config({**photos, "class_conditional": True}, {}).objective.learned_loss_weights is False
    assert build_config({"recipe": "small-data"}, {}).objective.learned_loss_weights is False
    assert build_config(photos, {"learned_loss_weights": "false"}).objective.learned_loss_weights is False
    # the user's own weighting wins over the recipe's, without an error
    assert build_config(photos, {"snr_gamma": "5"}).objective.learned_loss_weights is False
    edm = build_config(photos, {"objective": "edm", "prediction_type": "epsilon"})
    assert edm.objective.learned_loss_weights is False


def test_photos_recipe_trains_a_pipeline_plain_diffusers_reads_with_its_settings(image_folder, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *tiny_train_args(image_folder, out, max_train_steps=2, recipe="small-data-photos")]) == 0
    unet = UNet2DModel.load_config(out / "pipeline" / "unet")
    scheduler = DDPMScheduler.load_config(out / "pipeline" / "scheduler")
    assert unet["resnet_time_scale_shift"] == "scale_shift" and scheduler["beta_schedule"] == "squaredcos_cap_v2"
    assert scheduler["prediction_type"] == "v_prediction"
    # class-conditional: the export's saved guidance interval is the recipe's
    conditional = tmp_path / "conditional"
    assert main(["train", *tiny_train_args(image_folder, conditional, max_train_steps=2, recipe="small-data-photos",
                                           class_conditional=True)]) == 0
    assert json.loads((conditional / "pipeline" / "model_index.json").read_text())["guidance_interval"] == [0.0, 4.5]


def documented_rates() -> dict[str, tuple[float, int]]:
    """preset -> (learning rate, batch) as written in the "What was chosen" table of docs/recipes.md."""
    lines = (REPO / "docs" / "recipes.md").read_text().splitlines()
    start = lines.index("| preset | learning rate | batch | evidence |")
    table = {}
    for line in itertools.takewhile(lambda line: line.startswith("|"), lines[start + 2:]):
        presets, rate, batch = (cell.strip() for cell in line.strip("|").split("|")[:3])
        for preset in re.findall(r"`([a-z]+)`", presets):
            table[preset] = (float(rate), int(batch))
    return table


def test_recipe_learning_rate_depends_on_model_size():
    """The preset table, the effective config of `--recipe small-data` and the documented table agree."""
    assert recipe_settings("small-data", "tiny")["learning_rate"] > recipe_settings("small-data", "ddpm")["learning_rate"]
    documented = documented_rates()
    assert set(documented) == set(PRESETS), documented  # every model preset has a documented rate and batch
    for preset, (rate, batch) in documented.items():
        settings = recipe_settings("small-data", preset)
        assert (settings["learning_rate"], settings["train_batch_size"]) == (rate, batch), preset
        cfg = build_config({"recipe": "small-data", "model_preset": preset, "max_train_steps": 5}, {})
        assert (cfg.optim.learning_rate, cfg.optim.train_batch_size) == (rate, batch), preset


def test_flowers_config_uses_the_recipe():
    """configs/flowers64.yaml spells out the small-data recipe for its model (so the file reads on its own)."""
    values = load_yaml(str(REPO / "configs" / "flowers64.yaml"))
    for key, value in recipe_settings("small-data", values["model_preset"]).items():
        assert values.get(key) == (pytest.approx(value) if isinstance(value, float) else value), key


def test_unknown_recipe_is_a_user_error(tmp_path, capsys):
    assert main(["train", "--recipe", "big-data", "--max_train_steps", "1", "--output_dir", str(tmp_path)]) == 2
    assert "recipe must be one of small-data" in capsys.readouterr().err


@pytest.fixture(scope="module")
def npz_ablation(tmp_path_factory):
    """One small recipe ablation on an .npz bed (DDPM and EDM variants, class-conditional and unconditional rows), run
    once for this module: the test that reads its table and the sampler table's test, which scores its models."""
    folder = tmp_path_factory.mktemp("npz-ablation")
    npz = make_npz(folder / "tiny.npz", per_class=(100, 100, 100))
    out = folder / "ablation"
    result = run_command([sys.executable, "scripts/recipe_ablation.py", "--output_dir", str(out), "--bed",
                          "cifar10-5k", "--bed_path", str(npz), "--budget_images", "48", "--variants", "small-data",
                          "edm", "--conditioning", "class", "none", "--num_samples", "30", "--sampler_steps", "2",
                          "--resolution", "8", "--classifier_epochs", "2"], timeout=900)
    return out, result


@pytest.mark.slow
def test_ablation_on_an_npz_bed_reports_conditional_and_unconditional_rows(npz_ablation):
    out, result = npz_ablation
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["conditioning"], r["sampler"]) for r in rows] == [
        ("small-data", "class", "dpmsolver++"), ("edm", "class", "edm-dpmsolver++"),
        ("small-data", "none", "dpmsolver++"), ("edm", "none", "edm-dpmsolver++")]
    for row in rows:
        assert float(row["frechet"]) > 0 and float(row["real_vs_real"]) > 0
        assert (row["class_accuracy"] == "") == (row["conditioning"] == "none")
    assert json.loads((out / "judge.json").read_text())["classifier_held_out_accuracy"] > 0.5
    assert (out / "edm-uncond" / "grid.png").is_file() and not (out / "bed").exists()
    assert (out / "cifar10-5k" / "test" / "0_red").is_dir()  # the bed is written under output_dir, by its name


def test_ablation_rejects_unknown_variant(tmp_path, capsys):
    assert script_main("recipe_ablation")(["--output_dir", str(tmp_path), "--variants", "magic"]) == 2
    assert "unknown variant 'magic'" in capsys.readouterr().err


def test_ablation_refuses_to_mix_settings(tmp_path):
    from flowers_ddpm.experiments.ablation import AblationSettings

    (tmp_path / "settings.json").write_text(json.dumps({"budget_minutes": 3}))
    from flowers_ddpm.experiments import ablation

    with pytest.raises(UserError, match="other settings"):
        ablation.run_ablation(AblationSettings(output_dir=tmp_path, budget_minutes=10))


def test_real_baseline_has_the_samples_class_mix():
    """Held-out images sorted by class must not be taken as the first N (that baseline would be all 0s and 1s)."""
    import torch

    from flowers_ddpm.experiments.ablation import balanced_subset

    labels = torch.arange(10).repeat_interleave(5)  # sorted by class, like a class-folder listing
    picked = labels[balanced_subset(labels, 30)]
    assert torch.equal(torch.bincount(picked, minlength=10), torch.full((10,), 3))
    with pytest.raises(UserError, match="at most 50"):
        balanced_subset(labels, 60)


def test_train_seed_changes_only_the_training_seed(tmp_path):
    """`--train_seed` gives every variant another training seed; the split, judge and sampling seeds stay `--seed`
    (a variant that sets its own seed keeps it)."""
    data = BedData("digits", tmp_path / "train", tmp_path / "test", 32, 10, False)
    settings = ablation.AblationSettings(output_dir=tmp_path, seed=0, train_seed=1)
    written = ablation._write_config(tmp_path / "v", ablation.variant_settings("small-data"), data, settings)
    assert yaml.safe_load(written.read_text())["seed"] == 1 and settings.seed == 0
    own = ablation._write_config(tmp_path / "w", ablation.variant_settings("train-seed-1"), data,
                                 ablation.AblationSettings(output_dir=tmp_path, train_seed=5))
    assert yaml.safe_load(own.read_text())["seed"] == 1
    default = ablation._write_config(tmp_path / "x", ablation.variant_settings("small-data"), data,
                                     ablation.AblationSettings(output_dir=tmp_path, seed=3))
    assert yaml.safe_load(default.read_text())["seed"] == 3


@pytest.mark.parametrize("conditional", [True, False])
def test_every_variant_writes_a_config_that_passes_validation(tmp_path, conditional):
    """A variant whose settings contradict each other (e.g. two loss weightings) would fail only after the bed and
    its judge were built; every listed variant must validate as the config it writes."""
    data = BedData("digits", tmp_path / "train", tmp_path / "test", 32, 10, False)
    data.train_dir.mkdir()
    settings = ablation.AblationSettings(output_dir=tmp_path, guidance_interval=(0.0, 4.5))
    for name in ["diffusers-defaults", *ablation.RECIPES, *ablation.VARIANTS]:
        written = ablation._write_config(tmp_path / name, ablation.variant_settings(name, conditional), data,
                                         settings, conditional=conditional)
        cfg = build_config(load_yaml(str(written)), {})
        validate(cfg)
        assert cfg.model.class_conditional is conditional, name


def test_streaming_buffer_trains_through_the_streaming_path(tmp_path):
    data = BedData("digits", tmp_path / "train", tmp_path / "test", 32, 10, False)
    cached = yaml.safe_load(ablation._write_config(tmp_path / "v", ablation.variant_settings("small-data"), data,
                                                   ablation.AblationSettings(output_dir=tmp_path)).read_text())
    streamed = yaml.safe_load(ablation._write_config(
        tmp_path / "w", ablation.variant_settings("small-data"), data,
        ablation.AblationSettings(output_dir=tmp_path, streaming_buffer=1000)).read_text())
    assert cached["decode_cache"] is True
    assert streamed["decode_cache"] is False and streamed["shuffle_buffer_size"] == 1000
    with pytest.raises(UserError, match="streaming_buffer"):
        ablation.AblationSettings(output_dir=tmp_path, streaming_buffer=0).validate()


@pytest.mark.slow
def test_sampler_table_scores_class_conditional_and_unconditional_models(npz_ablation, capsys):
    out, trained = npz_ablation  # its small-data rows: a class-conditional and an unconditional model
    assert trained.returncode == 0, trained.stderr[-3000:]
    table = [sys.executable, "scripts/sampler_table.py", "--ablation_dir", str(out)]

    cond = run_command(table + ["--variant", "small-data", "--cells", "ddim:2:1.5", "ddpm:3:0"], timeout=600)
    assert cond.returncode == 0, cond.stderr[-3000:]
    rows = json.loads((out / "small-data" / "samplers" / "results.json").read_text())
    assert [(r["sampler"], r["steps"], r["guidance_scale"]) for r in rows] == [("ddim", 2, 1.5), ("ddpm", 3, 0.0)]
    assert all(0.0 <= r["class_accuracy"] <= 1.0 and r["frechet_ratio"] > 0 for r in rows)
    assert (out / "small-data" / "samplers" / "ddim-2-g1.5.png").is_file()

    uncond = run_command(table + ["--variant", "small-data-uncond", "--cells", "ddim:2:0"], timeout=600)
    assert uncond.returncode == 0, uncond.stderr[-3000:]
    [row] = json.loads((out / "small-data-uncond" / "samplers" / "results.json").read_text())
    assert row["class_accuracy"] is None and row["frechet_ratio"] > 0
    assert "| ddim | 2 | - / " in uncond.stdout

    # user errors: one sentence, exit 2, before the judge is trained or anything sampled (in this process: the
    # script's main, to spare three interpreter start-ups)
    sampler_table = script_main("sampler_table")
    for variant, cell, message in (("small-data-uncond", "ddim:2:1.5", "unconditional model, which has no guidance"),
                                   ("small-data", "heun:2:1.5", "scheduler must be one of"),
                                   ("small-data", "dpmsolver++:1000:1.5", "sampling steps")):
        assert sampler_table(["--ablation_dir", str(out), "--variant", variant, "--cells", cell]) == 2
        assert message in capsys.readouterr().err
    assert len(json.loads((out / "small-data" / "samplers" / "results.json").read_text())) == 2
