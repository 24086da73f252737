"""Every mistake a user can make gets one clear line and a non-zero exit code, before any expensive work."""

from __future__ import annotations

import pytest

from flowers_ddpm.cli import main

from .conftest import REPO, flowers_ddpm, tiny_train_args


def run_main(capsys, args):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(resolution=17), "resolution must be divisible by 2"),
        (dict(max_train_steps=-3), "max_train_steps must be >= 1"),
        (dict(model_preset="huge"), "model_preset must be one of ddpm, tiny"),
        (dict(prediction_type="noise"), "prediction_type must be one of epsilon, v_prediction, sample"),
        (dict(ddpm_beta_schedule="cubic"), "ddpm_beta_schedule must be one of linear, scaled_linear, squaredcos_cap_v2, sigmoid"),
        (dict(sample_scheduler="euler"), "sample_scheduler must be one of ddpm, ddim, dpmsolver++"),
        (dict(learning_rate="fast"), "learning_rate must be float"),
    ],
)
def test_invalid_values_are_rejected_naming_the_key(capsys, image_folder, tmp_path, overrides, message):
    code, err = run_main(capsys, ["train", *tiny_train_args(image_folder, tmp_path / "out", **overrides)])
    assert code == 2
    assert message in error_line(err)
    assert not (tmp_path / "out").exists()  # rejected before any work


def test_unknown_yaml_key_is_rejected(capsys, image_folder, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model_preset: tiny\nlearning_rat: 0.1\n")
    args = tiny_train_args(image_folder, tmp_path / "out")
    args[args.index("--config") + 1] = str(config)
    code, err = run_main(capsys, ["train", *args])
    assert code == 2 and "unknown setting 'learning_rat'" in error_line(err)


def test_missing_and_empty_data_folders(capsys, tmp_path):
    code, err = run_main(capsys, ["train", *tiny_train_args(tmp_path / "nope", tmp_path / "out")])
    assert code == 2 and "does not exist" in error_line(err)

    (tmp_path / "empty").mkdir()
    code, err = run_main(capsys, ["train", *tiny_train_args(tmp_path / "empty", tmp_path / "out")])
    assert code == 2 and "contains no image files" in error_line(err)

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("hello")
    code, err = run_main(capsys, ["train", *tiny_train_args(tmp_path / "texts", tmp_path / "out")])
    assert code == 2 and "contains no image files" in error_line(err)


def test_folder_where_no_image_can_be_read_is_an_error_not_a_hang(capsys, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_text("not a png")
    code, err = run_main(capsys, ["train", *tiny_train_args(folder, tmp_path / "out")])
    assert code == 2 and "could be read" in error_line(err)


def test_unreadable_files_are_skipped_and_warned_once(caplog, image_folder, tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(image_folder, folder)
    (folder / "red" / "truncated.jpg").write_bytes((image_folder / "red" / "01.jpg").read_bytes()[:40])
    (folder / "blue" / "empty.png").write_bytes(b"")
    with caplog.at_level("WARNING"):
        assert main(["train", *tiny_train_args(folder, tmp_path / "out", max_train_steps=16,
                                               checkpointing_steps=100)]) == 0
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert sum("truncated.jpg" in w for w in warnings) == 1  # seen in several epochs, warned once
    assert sum("empty.png" in w for w in warnings) == 1
    assert (tmp_path / "out" / "pipeline" / "model_index.json").is_file()


def test_missing_resume_path(capsys, image_folder, tmp_path):
    code, err = run_main(capsys, ["train", *tiny_train_args(image_folder, tmp_path / "out",
                                                            resume_from_checkpoint=str(tmp_path / "ckpt-9"))])
    assert code == 2 and "resume_from_checkpoint" in error_line(err) and "does not exist" in error_line(err)


def test_default_dataset_without_network_says_how_to_use_a_local_folder(capsys, tmp_path):
    code, err = run_main(capsys, ["train", "--config", str(REPO / "configs" / "tiny.yaml"), "--output_dir",
                                  str(tmp_path / "out"), "--logger", "none"])
    assert code == 2
    line = error_line(err)
    assert "nelorth/oxford-flowers" in line and "--train_data_dir" in line


def test_sample_from_missing_model(capsys, tmp_path):
    code, err = run_main(capsys, ["sample", "--model", str(tmp_path / "nothing"), "--output", str(tmp_path / "g.png")])
    assert code == 2 and "not a diffusers pipeline folder" in error_line(err)


@pytest.mark.slow
def test_exit_code_and_no_traceback_unless_debug(tmp_path):
    result = flowers_ddpm("train", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: config file {tmp_path / 'missing.yaml'} does not exist"
    assert "Traceback" not in result.stderr
    debug = flowers_ddpm("train", "--config", str(tmp_path / "missing.yaml"), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
