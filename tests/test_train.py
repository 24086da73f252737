"""End-to-end training on a generated image folder through the real streaming path."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flowers_ddpm.cli import main

from .conftest import REPO, free_port, resume_from_copy, run_command, tiny_train_args


def read_order(path):
    """{step: ids of every micro-batch of that step, in order}."""
    order: dict[int, list] = {}
    for entry in map(json.loads, path.read_text().splitlines()):
        order.setdefault(entry["step"], []).extend(entry["ids"])
    return order


def test_train_checkpoints_rotate_and_pipeline_loads_in_plain_diffusers(image_folder, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *tiny_train_args(image_folder, out, checkpoints_total_limit=2, save_images_steps=3,
                                           logger="tensorboard")]) == 0

    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-4", "checkpoint-6"]  # rotated: checkpoint-2 is gone, no .tmp left
    assert (out / "checkpoints" / "checkpoint-6" / "model.safetensors").is_file()
    assert (out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "pipeline" / "training_config.yaml").is_file()
    assert (out / "training_config.yaml").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    assert list((out / "logs").rglob("events.out.tfevents*"))

    from diffusers import DDPMPipeline, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out / "pipeline"))
    assert isinstance(pipe, DDPMPipeline)
    images = pipe(batch_size=4, num_inference_steps=3).images
    assert len(images) == 4 and all(image.size == (16, 16) for image in images)


@pytest.mark.parametrize("buffer_size", [10, 100])  # a shuffle buffer smaller than the 24 images; the exact shuffle
def test_resume_from_latest_continues_the_same_run(image_folder, tmp_path, buffer_size):
    # gradient accumulation, decode threads, flips, random crops and a shuffle buffer larger than a batch
    flags = dict(max_train_steps=8, checkpointing_steps=3, log_data_order=True, gradient_accumulation_steps=2,
                 dataloader_num_workers=2, random_flip=True, shuffle_buffer_size=buffer_size, train_batch_size=3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *tiny_train_args(image_folder, straight, **flags)]) == 0

    assert resume_from_copy(image_folder, straight, resumed, 6, **flags) == 0  # mid-epoch: 36 of 48 examples

    straight_order = read_order(straight / "data_order" / "rank0.jsonl")
    resumed_order = read_order(resumed / "data_order" / "rank0.jsonl")
    assert sorted(resumed_order) == [7, 8]  # continued at the saved step
    assert all(resumed_order[s] == straight_order[s] for s in resumed_order)  # same examples next, none re-read

    a, b = straight / "checkpoints" / "checkpoint-8", resumed / "checkpoints" / "checkpoint-8"
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    opt_a, opt_b = torch.load(a / "optimizer.bin"), torch.load(b / "optimizer.bin")
    for key, state in opt_a["state"].items():
        assert all(torch.equal(state[n], opt_b["state"][key][n]) for n in state)
    ema_a, ema_b = load_file(a / "ema.safetensors"), load_file(b / "ema.safetensors")
    assert ema_a.keys() == weights_a.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert (a / "trainer_state.json").read_text() == (b / "trainer_state.json").read_text()  # lr, step, EMA decay


def test_a_local_folder_run_records_its_source_resumes_from_it_and_says_where_everything_is(image_folder, tmp_path,
                                                                                            capsys):
    from flowers_ddpm.evaluation.command import reference_data_config

    out = tmp_path / "run"
    assert main(["train", *tiny_train_args(image_folder, out, max_train_steps=2, logger="tensorboard")]) == 0
    printed = capsys.readouterr().out
    assert "Training finished at step 2: 2 steps in " in printed and " images/s" in printed
    assert f"pipeline    {out / 'pipeline'}" in printed and f"tensorboard --logdir {out / 'logs'}" in printed
    for written in (out / "training_config.yaml", out / "pipeline" / "training_config.yaml"):
        config = yaml.safe_load(written.read_text())  # the source that was used, not the Hub default
        assert config["dataset_name"] is None and config["train_data_dir"] == str(image_folder)

    # the written config trains again (here: resumes, passing the resume checks) ...
    assert main(["train", "--config", str(out / "training_config.yaml"), "--max_train_steps", "4",
                 "--resume_from_checkpoint", "latest"]) == 0
    printed = capsys.readouterr().out
    assert "Training finished at step 4: 2 steps in " in printed and "over every resumed part" in printed
    assert json.loads((out / "pipeline" / "training_info.json").read_text())["global_step"] == 4
    # ... and evaluate compares with the folder the model was trained on
    data = reference_data_config(str(out / "pipeline"), {}, 16)
    assert data.train_data_dir == str(image_folder) and data.resolution == 16


@pytest.mark.slow
def test_two_processes_train_on_different_shards(image_folder, tmp_path):
    out = tmp_path / "ddp"
    result = run_command(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(REPO / "scripts" / "train.py"),
         # the speed settings at their defaults (auto, unset): they are decided before the Accelerator exists
         *tiny_train_args(image_folder, out, max_train_steps=4, log_data_order=True, mixed_precision="auto",
                          channels_last=None, compile=None)],
        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    rank0, rank1 = (read_order(out / "data_order" / f"rank{r}.jsonl") for r in (0, 1))
    assert sorted(rank0) == sorted(rank1) == [1, 2, 3, 4]
    first_epoch0 = {i for step in (1, 2) for i in rank0[step]}
    first_epoch1 = {i for step in (1, 2) for i in rank1[step]}
    assert first_epoch0.isdisjoint(first_epoch1)  # 24 images, 12 per process: each process its own shard
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert {p.name for p in (out / "checkpoints" / "checkpoint-4").iterdir()} >= {
        "data_state_rank0.json", "data_state_rank1.json", "model.safetensors", "COMPLETE"}
    assert result.stdout.count("Training finished at step 4") == 1  # the summary, from the main process only
    assert (out / "pipeline" / "model_index.json").is_file()
