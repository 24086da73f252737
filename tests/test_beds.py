"""The recipe ablation's test beds (issue 16): an .npz of real photographs (here a tiny generated one of the same
format) written as class folders with a fixed class-balanced held-out split, and the judge classifier on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowers_ddpm.errors import UserError
from flowers_ddpm.experiments import beds
from flowers_ddpm.experiments.ablation import AblationSettings, Scorer

from .conftest import make_npz, script_main


def test_npz_bed_holds_out_a_fixed_class_balanced_tenth(tmp_path):
    npz = make_npz(tmp_path / "tiny.npz")
    data = beds.write_bed("cifar10-5k", tmp_path / "bed", resolution=8, seed=0, path=npz)
    assert data.num_classes == 3 and data.random_flip
    assert sorted(p.name for p in data.train_dir.iterdir()) == ["0_red", "1_green", "2_blue"]
    train, train_labels = beds.load_folder(data.train_dir)
    test, test_labels = beds.load_folder(data.test_dir)
    assert train.shape[1:] == (3, 8, 8) and train.dtype == torch.uint8
    assert torch.bincount(test_labels).tolist() == [2, 3, 1]  # 10% of every class
    assert torch.bincount(train_labels).tolist() == [18, 27, 9]
    train_files = {p.name for p in data.train_dir.rglob("*.png")}
    test_files = {p.name for p in data.test_dir.rglob("*.png")}
    assert not train_files & test_files and len(train_files | test_files) == 60
    # the same split again (another folder, same seed), and pixels are kept exactly at the native size
    again = beds.write_bed("cifar10-5k", tmp_path / "again", resolution=8, seed=0, path=npz)
    assert {p.name for p in again.test_dir.rglob("*.png")} == test_files
    with np.load(npz) as raw:
        index = int(sorted(test_files)[0][:-4])
        first = next(data.test_dir.rglob(sorted(test_files)[0]))
        assert np.array_equal(np.asarray(beds.Image.open(first)), raw["images"][index])


def test_judge_learns_the_bed_and_scores_real_images_near_the_baseline(tmp_path):
    npz = make_npz(tmp_path / "tiny.npz", per_class=(100, 100, 100))
    settings = AblationSettings(output_dir=tmp_path / "out", bed="cifar10-5k", bed_path=npz, num_samples=30,
                                classifier_epochs=3, resolution=8)
    settings.validate()
    data = beds.write_bed("cifar10-5k", tmp_path / "bed", resolution=8, path=npz)
    scorer = Scorer(data, settings)
    assert scorer.classifier_accuracy == 1.0  # colours are trivially separable
    assert scorer.real_vs_real > 0 and scorer.reference.shape == (270, 64)


def test_judge_is_the_same_whatever_ran_before_it_in_the_process(tmp_path):
    """Two ablation runs with the same seed and data must score with the same judge, even when the process drew
    random numbers before training it (separate caches, so both are trained)."""
    npz = make_npz(tmp_path / "tiny.npz")
    data = beds.write_bed("cifar10-5k", tmp_path / "bed", resolution=8, path=npz)
    first, accuracy = beds.train_classifier(data, tmp_path / "cache-a", epochs=1, seed=0)
    torch.rand(1000)  # what a variant's planning or an earlier import might have drawn
    second, again = beds.train_classifier(data, tmp_path / "cache-b", epochs=1, seed=0)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert accuracy == again


def test_training_the_judge_leaves_the_callers_random_state_alone(tmp_path):
    npz = make_npz(tmp_path / "tiny.npz")
    data = beds.write_bed("cifar10-5k", tmp_path / "bed", resolution=8, path=npz)
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    beds.train_classifier(data, tmp_path / "cache", epochs=1, seed=0)
    assert torch.equal(torch.rand(5), expected)


def test_bed_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="needs --bed_path"):
        AblationSettings(output_dir=tmp_path, bed="cifar10-5k").validate()
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="lacks class_names, labels"):
        beds.write_bed("cifar10-5k", tmp_path / "bed", path=bad)
    with pytest.raises(UserError, match="conditioning must be"):
        AblationSettings(output_dir=tmp_path, conditioning=("maybe",)).validate()


def test_script_refuses_a_bed_without_its_file(tmp_path, capsys):
    assert script_main("recipe_ablation")(["--output_dir", str(tmp_path / "x"), "--bed", "cifar10-5k"]) == 2
    assert "needs --bed_path" in capsys.readouterr().err and not (tmp_path / "x").exists()
