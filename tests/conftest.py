"""Shared fixtures: generated image folders (class = colour), and helpers to run the CLI in or out of process."""

from __future__ import annotations

import os

# Tiny test models run faster on one thread, and two-process tests put two processes on the two cores; without
# this, intra-op threads of concurrent processes oversubscribe the CPU and runs get many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess  # noqa: E402
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (40, 60, 220), "red": (220, 40, 40)}

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def make_class_folder(root: Path, per_class: int = 12, colours: dict = COLOURS) -> Path:
    """A folder with one sub-folder per class; each image is a coloured disc on a light background."""
    for name, colour in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (20 + i % 5, 18 + i % 3), (235, 235, 235))
            ImageDraw.Draw(image).ellipse([3, 3, 16, 15], fill=colour)
            image.save(root / name / (f"{i:02d}.jpg" if i % 2 else f"{i:02d}.png"))
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """accelerate keeps process-wide singletons; give each in-process run a fresh one."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def tiny_train_args(data: Path, out: Path, **overrides) -> list[str]:
    """Command-line flags for a seconds-long CPU run of the tiny preset."""
    settings = dict(
        config=str(REPO / "configs" / "tiny.yaml"), train_data_dir=str(data), output_dir=str(out),
        resolution=16, train_batch_size=4, max_train_steps=6, checkpointing_steps=2, save_images_steps=100,
        eval_batch_size=2, ddpm_num_inference_steps=2, shuffle_buffer_size=8, logger="none",
    )
    settings.update(overrides)
    args = []
    for key, value in settings.items():
        if value is True:
            args.append(f"--{key}")
        elif value is False:
            args.append(f"--no-{key}")
        else:
            args += [f"--{key}", str(value)]
    return args


def run_command(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command in a fresh process (exit codes, signals, accelerate launch)."""
    # PYTHONPATH makes child processes import this checkout (not whatever `pip install -e` pointed at)
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONPATH": pythonpath, **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)


def flowers_ddpm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "flowers_ddpm.cli", *args], env=env)
