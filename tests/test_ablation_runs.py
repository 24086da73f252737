"""The recipe ablation and its time-to-quality mode run end to end on a generated bed: the table, the compute
budget, resuming an interrupted ablation, and when each recipe first reaches each quality threshold. (Apart from
tests/test_recipes.py so that a parallel test run can give the two long files to two workers.)"""

from __future__ import annotations

import csv
import json
import sys

import pytest
import yaml

from .conftest import run_command, script_main


@pytest.mark.slow
def test_ablation_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "ablation"
    args = [sys.executable, "scripts/recipe_ablation.py", "--output_dir", str(out), "--budget_images", "48",
            "--variants", "diffusers-defaults", "wide", "--num_samples", "20", "--sampler_steps", "2",
            "--resolution", "16", "--classifier_epochs", "1"]
    result = run_command(args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["diffusers-defaults", "wide"]
    for row in rows:
        assert 0.0 <= float(row["class_accuracy"]) <= 1.0 and float(row["frechet"]) > 0
        assert float(row["real_vs_real"]) > 0 and row["guidance"] == "every step"
    # the same compute: the wider UNet costs more FLOPs per image, so it gets fewer images (and steps)
    assert int(rows[1]["train_images"]) < int(rows[0]["train_images"])
    assert (out / "wide" / "grid.png").is_file() and (out / "results.md").read_text().count("\n") == 4
    config = yaml.safe_load((out / "wide" / "config.yaml").read_text())
    assert config["unet_config"] == {"block_out_channels": [48, 96, 96]} and config["class_conditional"]

    first = json.loads((out / "wide" / "result.json").read_text())
    (out / "diffusers-defaults" / "result.json").unlink()  # as if interrupted during the second-to-last variant
    again = run_command(args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "wide" / "result.json").read_text()) == first  # finished variants are not rerun
    assert (out / "diffusers-defaults" / "result.json").is_file()
    # a later invocation into the same folder for one variant keeps the other's row in the table
    args[args.index("--variants"):args.index("--variants") + 3] = ["--variants", "wide"]
    assert script_main("recipe_ablation")(args[2:]) == 0  # nothing left to train: in this process
    with open(out / "results.csv") as f:
        assert sorted(r["variant"] for r in csv.DictReader(f)) == ["diffusers-defaults", "wide"]


@pytest.mark.slow
def test_time_to_quality_reports_when_each_recipe_first_reaches_each_threshold(tmp_path, capsys):
    out = tmp_path / "ttq"
    # a threshold every export meets and one none can: the first export reaches one, no export the other
    result = run_command([sys.executable, "scripts/recipe_ablation.py", "--time_to_quality", "--output_dir", str(out),
                          "--budget_images", "64", "--export_every_images", "16", "--thresholds", "1e9", "1e-9",
                          "--num_samples", "20", "--sampler_steps", "2", "--resolution", "16",
                          "--classifier_epochs", "1", "--mixed_precision", "no"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Frechet ratio <=" in result.stdout
    document = json.loads((out / "time_to_quality.json").read_text())
    runs = document["runs"]
    assert list(runs) == ["small-data", "diffusers-defaults"]
    for name, run in runs.items():
        exports = run["exports"]
        assert run["train_images"] == 64 and run["mixed_precision"]["used"] == "no"
        # every export of the run is judged (the strictest threshold is never met), in training order: the images
        # grow by the export interval, and the trainer's clock grows with them and ends at the run's total
        assert [e["train_images"] for e in exports] == [16, 32, 48, 64]
        assert [e["step"] * run["batch_size"] for e in exports] == [16, 32, 48, 64]
        seconds = [e["training_seconds"] for e in exports]
        assert all(a < b for a, b in zip(seconds, seconds[1:])) and seconds[-1] <= run["training_seconds"] + 0.1
        assert all(e["frechet_ratio"] > 0 and 0 <= e["class_accuracy"] <= 1 for e in exports)
        assert len(list((out / f"ttq-{name}" / "run" / "exports").glob("step-*"))) == 4
    reached, never = document["summary"]
    for key, name in (("recipe", "small-data"), ("reference", "diffusers-defaults")):
        first = runs[name]["exports"][0]
        assert (reached[f"{key}_images"], reached[f"{key}_seconds"]) == (16, first["training_seconds"])
        assert never[f"{key}_images"] is None and never[f"{key}_seconds"] is None
    assert reached["time_ratio"] == pytest.approx(reached["reference_seconds"] / reached["recipe_seconds"])
    assert not reached["lower_bound"] and never["time_ratio"] is None
    with open(out / "time_to_quality.csv") as f:
        assert len(list(csv.DictReader(f))) == 8
    assert (out / "time_to_quality.md").read_text().count("not reached") == 4  # images and seconds of each
    other = script_main("recipe_ablation")(["--time_to_quality", "--output_dir", str(out), "--budget_images", "128",
                                            "--export_every_images", "16", "--resolution", "16"])
    assert other == 2 and "other settings" in capsys.readouterr().err  # finished runs of 64 images are not reused


def test_time_to_quality_flags_a_threshold_the_reference_never_reached_as_a_lower_bound():
    from flowers_ddpm.experiments.time_to_quality import format_table, summarise

    def run(ratios, seconds_per_export, batch=8):
        exports = [{"train_images": 800 * (i + 1), "training_seconds": seconds_per_export * (i + 1),
                    "frechet_ratio": r} for i, r in enumerate(ratios)]
        return {"exports": exports, "training_seconds": seconds_per_export * len(ratios),
                "train_images": 800 * len(ratios)}

    results = {"small-data": run([40.0, 4.0], 30.0), "diffusers-defaults": run([90.0, 45.0, 30.0, 25.0], 20.0)}
    loose, strict = summarise(results, (50.0, 5.0))
    assert (loose["recipe_images"], loose["reference_images"]) == (800, 1600)  # the first export at or below 50
    assert loose["time_ratio"] == pytest.approx(40.0 / 30.0) and not loose["lower_bound"]
    assert (strict["recipe_images"], strict["reference_images"]) == (1600, None)
    # never reached in the reference's 80 s: the ratio is at least its whole run over the recipe's 60 s
    assert strict["lower_bound"] and strict["time_ratio"] == pytest.approx(80.0 / 60.0)
    assert strict["images_ratio"] == pytest.approx(3200 / 1600)
    table = format_table([loose, strict])
    assert ">1.3x" in table and "| 5x | 1,600 | 60.0 | not reached | not reached |" in table


@pytest.mark.slow
def test_ablation_scores_post_hoc_ema_lengths_beside_each_variants_own_ema(tmp_path):
    out = tmp_path / "ablation"
    args = ["--output_dir", str(out), "--budget_images", "48", "--variants", "small-data", "--num_samples", "20",
            "--sampler_steps", "2", "--resolution", "16", "--classifier_epochs", "1", "--ema_sigma_rel", "0.05", "0.2"]
    assert script_main("recipe_ablation")(args) == 0

    def rows():
        with open(out / "results.csv") as f:
            return list(csv.DictReader(f))

    first = rows()
    assert [r["variant"] for r in first] == ["small-data", "small-data@sigma_rel-0.05", "small-data@sigma_rel-0.2"]
    # one training run: its figures on every row; each EMA length's samples scored on their own
    assert len({(r["steps"], r["train_images"], r["final_loss"]) for r in first}) == 1
    assert len({r["frechet"] for r in first}) == 3
    assert first[1]["changes"].endswith("post-hoc EMA sigma_rel 0.05")
    run = out / "small-data" / "run"
    assert yaml.safe_load((run / "pipeline" / "training_config.yaml").read_text())["phema_sigma_rel"] == "0.05,0.1"
    assert len(list((run / "phema").glob("step-*.safetensors"))) == 6  # 6 steps, a snapshot every step
    weights = [(run / "ema-reconstruct" / f"sigma_rel-{s}" / "unet" / "diffusion_pytorch_model.safetensors")
               for s in ("0.05", "0.2")]
    assert weights[0].read_bytes() != weights[1].read_bytes()
    assert all((out / "small-data" / f"grid-sigma_rel-{s}.png").is_file() for s in ("0.05", "0.2"))

    assert script_main("recipe_ablation")(args) == 0  # finished: nothing is trained or scored again
    assert rows() == first
    other = [*args[:-2], "0.1"]  # other lengths are other settings: refused for this folder
    assert script_main("recipe_ablation")(other) == 2


def test_ablation_refuses_ema_lengths_outside_the_power_function_range(tmp_path, capsys):
    args = ["--output_dir", str(tmp_path / "out"), "--budget_images", "48", "--ema_sigma_rel", "0.05", "0.3"]
    assert script_main("recipe_ablation")(args) == 2
    assert "--ema_sigma_rel values must lie in (0, 0.28)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
