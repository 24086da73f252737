"""A diffusers user's command line works unchanged (issue 15): every flag of diffusers'
examples/unconditional_image_generation/train_unconditional.py is accepted with its meaning."""

from __future__ import annotations

import importlib.util
import json
import typing
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import SchedulerType

from flowers_ddpm.cli import build_parser, main
from flowers_ddpm.config.diffusers_compat import compatibility_table, run_differences
from flowers_ddpm.config.loading import build_config, parse_train_config
from flowers_ddpm.config.sections import BETA_SCHEDULES, LR_SCHEDULERS
from flowers_ddpm.models.unet import PRESETS, build_unet, unet_overrides
from flowers_ddpm.pipelines.sampling import make_scheduler
from flowers_ddpm.training.run_setup import loop_settings, resolve_max_train_steps

from .conftest import REPO, tiny_train_args

# The example's flags (diffusers 0.30-0.36, `parse_args`), each with a value of the kind it takes.
DIFFUSERS_EXAMPLE_FLAGS = {
    "--dataset_name": "nelorth/oxford-flowers", "--dataset_config_name": "default",
    "--model_config_name_or_path": None, "--train_data_dir": None, "--output_dir": None,
    "--overwrite_output_dir": True, "--cache_dir": "hf-cache", "--resolution": "16", "--center_crop": True,
    "--random_flip": True, "--train_batch_size": "4", "--eval_batch_size": "2", "--dataloader_num_workers": "0",
    "--num_epochs": "1", "--save_images_epochs": "10", "--save_model_epochs": "10",
    "--gradient_accumulation_steps": "1", "--learning_rate": "1e-4", "--lr_scheduler": "cosine",
    "--lr_warmup_steps": "500", "--adam_beta1": "0.95", "--adam_beta2": "0.999", "--adam_weight_decay": "1e-6",
    "--adam_epsilon": "1e-08", "--use_ema": True, "--ema_inv_gamma": "1.0", "--ema_power": "0.75",
    "--ema_max_decay": "0.9999", "--push_to_hub": True, "--hub_token": "hf_secret", "--hub_model_id": "me/ddpm",
    "--hub_private_repo": True, "--logger": "tensorboard", "--logging_dir": "logs", "--local_rank": "-1",
    "--mixed_precision": "no", "--prediction_type": "epsilon", "--ddpm_num_steps": "1000",
    "--ddpm_num_inference_steps": "1000", "--ddpm_beta_schedule": "linear", "--checkpointing_steps": "500",
    "--checkpoints_total_limit": "2", "--resume_from_checkpoint": "latest",
    "--enable_xformers_memory_efficient_attention": True,
}


@pytest.fixture(scope="module")
def tiny_unet_config(tmp_path_factory) -> Path:
    """A UNet2DModel config folder, as --model_config_name_or_path takes (the tiny preset's architecture)."""
    folder = tmp_path_factory.mktemp("unet-config")
    UNet2DModel(sample_size=16, **PRESETS["tiny"]).save_config(folder)
    return folder


def _flag_args(flags: dict, folder: Path, out: Path, unet_config: Path) -> list[str]:
    values = {**flags, "--train_data_dir": str(folder), "--output_dir": str(out),
              "--model_config_name_or_path": str(unet_config)}
    args = []
    for flag, value in values.items():
        args += [flag] if value is True else [flag, value]
    return args


def test_every_flag_of_the_example_is_accepted(image_folder, tmp_path, tiny_unet_config):
    parser_args = _flag_args(DIFFUSERS_EXAMPLE_FLAGS, image_folder, tmp_path / "out", tiny_unet_config)
    cfg = parse_train_config(build_parser().parse_args(["train", *parser_args]))  # parsed, not trained
    assert cfg.run.save_images_epochs == 10 and cfg.optim.num_epochs == 1 and cfg.run.overwrite_output_dir
    assert cfg.model.model_config_name_or_path == str(tiny_unet_config) and cfg.hub.hub_token == "hf_secret"
    assert "hub_token" not in cfg.to_dict()  # never written to training_config.yaml, checkpoints or the card


def test_report_to_is_the_logger(image_folder, tmp_path):
    cfg = build_config({"report_to": "none"}, {"train_data_dir": str(image_folder), "max_train_steps": 1})
    assert cfg.run.logger == "none"


def test_schedules_are_every_one_diffusers_has():
    accepted = typing.get_args(typing.get_type_hints(DDPMScheduler.__init__)["beta_schedule"])
    assert set(BETA_SCHEDULES) == set(accepted)
    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


@pytest.mark.parametrize("schedule", ["scaled_linear", "sigmoid"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++"])
def test_every_beta_schedule_samples_with_every_sampler(schedule, sampler):
    training = DDPMScheduler(num_train_timesteps=100, beta_schedule=schedule)
    scheduler = make_scheduler(sampler, training.config)
    assert torch.allclose(scheduler.alphas_cumprod, training.alphas_cumprod)


def test_piecewise_constant_needs_its_rules(image_folder, tmp_path, capsys):
    args = tiny_train_args(image_folder, tmp_path / "a", lr_scheduler="piecewise_constant")
    assert main(["train", *args]) == 2
    assert "lr_step_rules" in capsys.readouterr().err
    args = tiny_train_args(image_folder, tmp_path / "b", lr_scheduler="piecewise_constant", lr_warmup_steps=0,
                           lr_step_rules="1:3,0.1")
    assert main(["train", *args]) == 0
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "b" / "report" / "loss.jsonl").read_text().splitlines()]
    assert lrs and lrs[-1] == pytest.approx(0.1 * 1e-3)


def test_unknown_flag_names_the_subcommand_and_the_nearest_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--save_image_epochs", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: flowers-ddpm train ")
    assert "did you mean --save_images_epochs?" in err


def test_missing_length_is_diffusers_hundred_epochs(image_folder):
    cfg = build_config({}, {"train_data_dir": str(image_folder), "train_batch_size": 8})
    assert resolve_max_train_steps(cfg, num_examples=24, world_size=1) == 100 * 3


def test_epochs_count_optimizer_steps_as_diffusers_example_does(image_folder):
    """train_unconditional.py: ceil(N / batch) batches per epoch (the last one short), ceil over the processes,
    then ceil over gradient accumulation; max_train_steps = num_epochs * that."""
    def steps(num_examples, batch, world, accumulation, epochs=2):
        cfg = build_config({}, {"train_data_dir": str(image_folder), "train_batch_size": batch, "num_epochs": epochs,
                                "gradient_accumulation_steps": accumulation})
        return resolve_max_train_steps(cfg, num_examples=num_examples, world_size=world)

    assert steps(24, 16, 1, 1) == 2 * 2  # 2 batches (16 + 8) per epoch, not 48 / 16 = 3 steps in all
    assert steps(8189, 16, 1, 1, epochs=100) == 100 * 512  # Flowers102 at diffusers' README settings
    assert steps(100, 16, 2, 1) == 2 * 4  # 7 batches over 2 processes: 4 on the first
    assert steps(100, 16, 2, 3) == 2 * 2  # 4 batches, accumulated 3 at a time: 2 optimizer steps


def test_epoch_intervals_become_steps(image_folder):
    cfg = build_config({}, {"train_data_dir": str(image_folder), "save_images_epochs": 2, "save_model_epochs": 5,
                            "max_train_steps": 50})
    settings = loop_settings(cfg, 50, per_epoch=3)
    assert (settings.save_images_steps, settings.save_model_steps) == (6, 15)


def test_model_config_replaces_the_preset(tiny_unet_config, image_folder):
    cfg = build_config({}, {"train_data_dir": str(image_folder), "max_train_steps": 1,
                            "model_config_name_or_path": str(tiny_unet_config)})  # model_preset stays "ddpm"
    unet = build_unet(cfg.model.model_preset, 16, unet_overrides(cfg.model))
    assert list(unet.config.block_out_channels) == list(PRESETS["tiny"]["block_out_channels"])


def test_differences_from_diffusers_are_named_only_where_they_apply(image_folder):
    cfg = build_config({}, {"train_data_dir": str(image_folder), "max_train_steps": 1})
    names = {note.split("=")[0] for note in run_differences(cfg)}
    assert {"use_ema", "ddpm_num_inference_steps", "sample_scheduler"} <= names
    assert "dataset_name" not in names and "dataset_split" not in names  # a local folder
    cfg = build_config({}, {"train_data_dir": str(image_folder), "max_train_steps": 1, "use_ema": False})
    assert "use_ema" not in {note.split("=")[0] for note in run_differences(cfg)}


def test_compatibility_page_is_generated_from_the_table():
    assert (REPO / "docs" / "diffusers-compatibility.md").read_text() == compatibility_table()


@pytest.mark.slow
def test_the_diffusers_readme_command_line_runs(image_folder, tmp_path, tiny_unet_config, caplog):
    """diffusers' README flowers-64 command, verbatim but for the data folder, a tiny UNet config and 1 epoch."""
    out = tmp_path / "ddpm-ema-flowers-64"
    argv = ["train", f"--train_data_dir={image_folder}", "--resolution=16", "--center_crop", "--random_flip",
            f"--output_dir={out}", "--train_batch_size=16", "--num_epochs=1", "--gradient_accumulation_steps=1",
            "--use_ema", "--learning_rate=1e-4", "--lr_warmup_steps=500", "--mixed_precision=no",
            f"--model_config_name_or_path={tiny_unet_config}", "--hub_token=hf_not_written_anywhere",
            "--logger=none", "--ddpm_num_inference_steps=2", "--eval_batch_size=2"]
    with caplog.at_level("INFO", logger="flowers_ddpm"):
        assert main(argv) == 0
    assert (out / "pipeline" / "model_index.json").is_file()
    assert "differ from diffusers' train_unconditional.py" in caplog.text
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_not_written_anywhere" not in path.read_bytes(), path


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
@pytest.mark.parametrize("flag", ["--logger", "--report_to"])
def test_wandb_without_wandb_is_one_line_before_any_work(image_folder, tmp_path, capsys, flag):
    args = tiny_train_args(image_folder, tmp_path / "out", logger="none")
    assert main(["train", *args, flag, "wandb"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'flowers-ddpm[wandb]'" in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_hub_token_with_wandb_is_refused_as_diffusers_does(image_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else None)
    args = tiny_train_args(image_folder, tmp_path / "out", logger="wandb", hub_token="hf_x")
    assert main(["train", *args]) == 2
    assert "security risk of exposing your token" in capsys.readouterr().err
