"""Configuration: defaults < YAML < command line, diffusers flag names, effective config saved."""

from __future__ import annotations

import argparse

import yaml

from flowers_ddpm.config.loading import add_train_arguments, parse_train_config

from .conftest import REPO


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parse_train_config(parser.parse_args(list(argv)))


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    cfg = parse("--config", str(REPO / "configs" / "flowers64.yaml"), "--learning_rate", "3e-4", "--no-random_flip")
    assert cfg.model.model_preset == "ddpm" and cfg.data.resolution == 64 and cfg.data.center_crop is True  # from YAML
    assert cfg.optim.learning_rate == 3e-4 and cfg.data.random_flip is False  # from flags
    assert cfg.optim.adam_beta2 == 0.999  # default


def test_diffusers_example_command_line_is_accepted():
    cfg = parse("--dataset_name", "huggan/flowers-102-categories", "--resolution", "64", "--center_crop",
                "--random_flip", "--train_batch_size", "16", "--gradient_accumulation_steps", "1",
                "--learning_rate", "1e-4", "--lr_scheduler", "cosine", "--lr_warmup_steps", "500",
                "--adam_weight_decay", "1e-6", "--use_ema", "--ema_max_decay", "0.9999", "--mixed_precision", "no",
                "--prediction_type", "epsilon", "--ddpm_num_steps", "1000", "--ddpm_beta_schedule", "linear",
                "--checkpointing_steps", "500", "--checkpoints_total_limit", "3", "--output_dir", "x",
                "--logger", "tensorboard", "--seed", "1", "--dataloader_num_workers", "2", "--max_train_steps", "10")
    assert cfg.data.dataset_name == "huggan/flowers-102-categories" and cfg.run.checkpoints_total_limit == 3


def test_every_yaml_preset_is_valid():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert {"flowers64.yaml", "tiny.yaml"} <= {path.name for path in paths} and len(paths) >= 2, paths
    for path in paths:
        parse("--config", str(path))


def test_effective_config_round_trips(tmp_path):
    cfg = parse("--config", str(REPO / "configs" / "tiny.yaml"), "--seed", "7")
    cfg.save_yaml(tmp_path / "effective.yaml")
    again = parse("--config", str(tmp_path / "effective.yaml"))
    assert again == cfg and yaml.safe_load((tmp_path / "effective.yaml").read_text())["seed"] == 7
