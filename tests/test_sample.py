"""The sample command: a grid PNG, individual PNGs, deterministic per seed, honours --scheduler and --steps."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flowers_ddpm.cli import main
from flowers_ddpm.models.unet import build_noise_scheduler, build_unet
from flowers_ddpm.pipelines.export import export_pipeline
from flowers_ddpm.pipelines.sampling import generate, image_grid, load_pipeline


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "pipeline"
    export_pipeline(build_unet("tiny", 16), build_noise_scheduler(1000, "linear", "epsilon"), path)
    return path


def sample(pipeline_dir, out, *extra):
    args = ["sample", "--model", str(pipeline_dir), "--num_images", "5", "--steps", "3", "--output", str(out), *extra]
    assert main(args) == 0
    return out.read_bytes()


def test_same_seed_same_images_and_files(pipeline_dir, tmp_path):
    first = sample(pipeline_dir, tmp_path / "a.png", "--seed", "0", "--scheduler", "ddim", "--output_dir",
                   str(tmp_path / "each"))
    again = sample(pipeline_dir, tmp_path / "b.png", "--seed", "0", "--scheduler", "ddim", "--batch_size", "2")
    other = sample(pipeline_dir, tmp_path / "c.png", "--seed", "1", "--scheduler", "ddim")
    assert first == again  # batch size does not change the images either
    assert first != other
    assert Image.open(tmp_path / "a.png").size == (80, 16)  # 5 images -> one full row of 16 px tiles
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [f"{i:05d}.png" for i in range(5)]


@pytest.mark.parametrize("name, cls", [("ddpm", "DDPMScheduler"), ("ddim", "DDIMScheduler"),
                                       ("dpmsolver++", "DPMSolverMultistepScheduler"),
                                       ("sde-dpmsolver++", "DPMSolverMultistepScheduler")])
def test_scheduler_and_steps_are_honoured(pipeline_dir, name, cls):
    pipe = load_pipeline(str(pipeline_dir), torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    images = generate(pipe, 2, steps=4, seed=0, scheduler=name)
    assert type(pipe.scheduler).__name__ == cls
    if cls == "DPMSolverMultistepScheduler":
        assert pipe.scheduler.config.algorithm_type == name
    assert len(calls) == 4  # one UNet evaluation per step (the batch of 2 goes through together)
    assert len(images) == 2


def test_different_schedulers_give_different_images(pipeline_dir, tmp_path):
    assert sample(pipeline_dir, tmp_path / "a.png", "--scheduler", "ddim") != sample(
        pipeline_dir, tmp_path / "b.png", "--scheduler", "ddpm")


def test_the_stochastic_solver_draws_its_fresh_noise_from_each_images_generator(pipeline_dir, tmp_path):
    """sde-dpmsolver++ adds noise at every step: still the same images for a seed whatever the batch size (image i's
    noise comes from its own generator), and not the deterministic solver's images."""
    first = sample(pipeline_dir, tmp_path / "a.png", "--scheduler", "sde-dpmsolver++")
    assert first == sample(pipeline_dir, tmp_path / "b.png", "--scheduler", "sde-dpmsolver++", "--batch_size", "2")
    assert first != sample(pipeline_dir, tmp_path / "c.png", "--scheduler", "dpmsolver++")
    assert first != sample(pipeline_dir, tmp_path / "d.png", "--scheduler", "sde-dpmsolver++", "--seed", "1")


def test_step_counts_the_sampler_cannot_take_are_one_line_errors(tmp_path, capsys):
    torch.manual_seed(0)
    short = tmp_path / "short"  # trained with 10 timesteps
    export_pipeline(build_unet("tiny", 16), build_noise_scheduler(10, "linear", "epsilon"), short)
    common = ["sample", "--model", str(short), "--num_images", "1", "--output", str(tmp_path / "x.png")]
    assert main([*common, "--scheduler", "dpmsolver++", "--steps", "10"]) != 0  # diffusers: IndexError mid-way
    assert "this sampler takes 1 to 9 steps for a model trained with 10 timesteps" in capsys.readouterr().err
    assert main([*common, "--scheduler", "ddim", "--steps", "11"]) != 0
    assert "takes 1 to 10 steps" in capsys.readouterr().err
    assert main([*common, "--scheduler", "dpmsolver++", "--steps", "9"]) == 0
    assert main([*common, "--scheduler", "ddpm", "--steps", "10"]) == 0


def test_one_progress_bar_counts_every_image(pipeline_dir, tmp_path, capsys):
    sample(pipeline_dir, tmp_path / "grid.png", "--batch_size", "2")  # 3 batches of 3 steps
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "sample: 100%" in err and "5/5" in err  # one bar over the 5 images ...
    assert "3/3" not in err and "0/3" not in err  # ... not the pipeline's bar of 3 steps for each batch
    pipe = load_pipeline(str(pipeline_dir), torch.device("cpu"))
    pipe.set_progress_bar_config(leave=False, desc="mine")
    generate(pipe, 1, 2, seed=0)
    assert pipe._progress_bar_config == {"leave": False, "desc": "mine"}  # the caller's settings are kept


@pytest.mark.parametrize("count, cols, rows", [(10, 5, 2), (16, 4, 4), (12, 4, 3), (3, 3, 1), (7, 3, 3)])
def test_grids_fill_their_rows_where_the_count_allows(count, cols, rows):
    """One image per class of a 10-class run is 5 x 2, not a 4 x 3 grid with two black tiles; a prime count pads."""
    tiles = [Image.new("RGB", (4, 4), (255, 255, 255)) for _ in range(count)]
    grid = image_grid(tiles)
    assert grid.size == (4 * cols, 4 * rows)
    black = sum(grid.getpixel((4 * c, 4 * r)) == (0, 0, 0) for r in range(rows) for c in range(cols))
    assert black == cols * rows - count
