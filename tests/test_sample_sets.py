"""The recipe ablation's `--sample_sets K`: every score is the mean over K independent sample sets (set k from
sample seed seed + SET_STRIDE * k), the table shows the sets' range, and K = 1 scores, saves and resumes exactly as
before the option existed."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import UNet2DModel

from flowers_ddpm.errors import UserError
from flowers_ddpm.experiments import ablation, beds
from flowers_ddpm.experiments.ablation import SET_STRIDE, AblationSettings, Scorer
from flowers_ddpm.models.unet import build_noise_scheduler
from flowers_ddpm.pipelines.export import save_pipeline
from flowers_ddpm.pipelines.guided import GuidedDDPMPipeline

from .conftest import make_npz, script_main

TODAYS_KEYS = {"frechet", "frechet_ratio", "class_accuracy", "guidance", "sample_images_per_sec"}


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """A judge on a tiny three-colour bed, and an untrained class-conditional 8x8 pipeline to score."""
    root = tmp_path_factory.mktemp("sets")
    npz = make_npz(root / "tiny.npz", per_class=(100, 100, 100))
    settings = AblationSettings(output_dir=root / "out", bed="cifar10-5k", bed_path=npz, num_samples=30,
                                classifier_epochs=1, resolution=8, sampler_steps=2)
    scorer = Scorer(beds.write_bed("cifar10-5k", root / "bed", resolution=8, path=npz), settings)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, layers_per_block=1, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=4)  # three classes and "no class"
    pipe = GuidedDDPMPipeline(unet=unet.eval(), scheduler=build_noise_scheduler(1000, "linear", "epsilon"))
    return scorer, save_pipeline(pipe, root / "pipeline"), root


def score(judged, name: str, **changes) -> dict:
    scorer, pipeline, root = judged
    scorer.settings = dataclasses.replace(scorer.settings, **changes)
    return scorer.score(pipeline, root / f"{name}.png", "ddim")


def test_several_sample_sets_score_the_mean_of_scoring_each_set_alone(judged):
    first, second = score(judged, "first", seed=3), score(judged, "second", seed=3 + SET_STRIDE)
    both = score(judged, "both", seed=3, sample_sets=2)
    assert set(first) == TODAYS_KEYS  # one set: the keys as before sample sets existed
    assert first["frechet_ratio"] != second["frechet_ratio"]  # the sets are different samples
    assert both["frechet_ratio_sets"] == [first["frechet_ratio"], second["frechet_ratio"]]
    assert both["class_accuracy_sets"] == [first["class_accuracy"], second["class_accuracy"]]
    for key in ("frechet", "frechet_ratio", "class_accuracy"):
        assert both[key] == pytest.approx((first[key] + second[key]) / 2)
    root = judged[2]
    assert (root / "both.png").read_bytes() == (root / "first.png").read_bytes()  # the grid is the first set's


def test_the_table_shows_the_range_of_the_sets_ratios_only_for_several_sets(tmp_path):
    one = {"variant": "a", "frechet_ratio": 2.5}
    ablation.write_table([one], tmp_path)
    assert "ratio_range" not in (tmp_path / "results.md").read_text()
    ablation.write_table([{**one, "frechet_ratio_sets": [2.77, 2.27]}], tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "| frechet_ratio | ratio_range |" in text and "| 2.500 | 2.27-2.77 |" in text
    assert "means over 2 sample sets" in text
    with open(tmp_path / "results.csv") as f:
        assert next(csv.DictReader(f))["ratio_range"] == "2.27-2.77"


def test_a_folder_saved_before_sample_sets_resumes_as_one_set(tmp_path):
    one = AblationSettings(output_dir=tmp_path)
    old = {k: v for k, v in ablation._comparable(one).items() if k != "sample_sets"}
    assert old == ablation._comparable(one)  # one set is saved as before the option existed
    (tmp_path / "settings.json").write_text(json.dumps(old))
    assert ablation.saved_settings(tmp_path).sample_sets == 1
    ablation._check_same_settings(one)
    with pytest.raises(UserError, match=r"other settings \(sample_sets\)"):
        ablation._check_same_settings(AblationSettings(output_dir=tmp_path, sample_sets=2))


@pytest.mark.parametrize("args, error", [
    (["--sample_sets", "0"], "sample_sets must be >= 1; got 0"),
    (["--sample_sets", "2", "--num_samples", str(SET_STRIDE)], f"num_samples must be < {SET_STRIDE}"),
])
def test_the_script_refuses_impossible_sample_sets_in_one_line(tmp_path, capsys, args, error):
    assert script_main("recipe_ablation")(["--output_dir", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert error in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_time_to_quality_keeps_each_sample_sets_scores_beside_the_means(judged, tmp_path):
    from flowers_ddpm.experiments import time_to_quality

    scorer, pipeline, _ = judged
    scorer.settings = dataclasses.replace(scorer.settings, seed=3, sample_sets=2)
    run_dir = tmp_path / "run"
    for step, seconds in ((2, 1.5), (4, 3.0)):  # two exports of a run, as the trainer writes them
        export = run_dir / "exports" / f"step-{step:07d}"
        shutil.copytree(pipeline, export)
        (export / "training_info.json").write_text(json.dumps({"training_seconds": seconds}))
    (tmp_path / "grids").mkdir()
    rows = time_to_quality.judge_exports(run_dir, scorer, "ddim", (1e-9,), 8, tmp_path / "grids")
    assert [row["train_images"] for row in rows] == [16, 32]
    for row in rows:  # the same weights: the same two sets, their mean the row's score
        assert len(row["frechet_ratio_sets"]) == 2 and len(row["class_accuracy_sets"]) == 2
        assert row["frechet_ratio"] == pytest.approx(sum(row["frechet_ratio_sets"]) / 2)
    results = {"small-data": {"exports": rows}}
    time_to_quality.write_outputs(results, [], {}, time_to_quality.TimeToQualitySettings(), tmp_path)
    with open(tmp_path / "time_to_quality.csv") as f:
        written = list(csv.DictReader(f))
    assert [float(v) for v in written[0]["frechet_ratio_sets"].split()] == pytest.approx(rows[0]["frechet_ratio_sets"],
                                                                                         abs=1e-4)
    assert len(written[1]["class_accuracy_sets"].split()) == 2
    saved = json.loads((tmp_path / "time_to_quality.json").read_text())
    assert saved["runs"]["small-data"]["exports"][1]["frechet_ratio_sets"] == rows[1]["frechet_ratio_sets"]

    one_set = [{k: v for k, v in row.items() if not k.endswith("_sets")} for row in rows]
    time_to_quality.write_outputs({"small-data": {"exports": one_set}}, [], {}, time_to_quality.TimeToQualitySettings(),
                                  tmp_path)
    with open(tmp_path / "time_to_quality.csv") as f:  # one set: the columns as before sample sets existed
        assert next(csv.reader(f)) == ["recipe", "step", "train_images", "training_seconds", "frechet",
                                       "frechet_ratio", "class_accuracy"]
