"""Shared fixtures: generated image folders (class = colour), and helpers to run the CLI in or out of process."""

from __future__ import annotations

import os

# Tiny test models run faster on one thread, and two-process tests put two processes on the two cores; without
# this, intra-op threads of concurrent processes oversubscribe the CPU and runs get many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network (set before any Hub library loads)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import runpy  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from flowers_ddpm.cli import main  # noqa: E402
from flowers_ddpm.experiments.soak import make_class_folder, tiny_train_args  # noqa: E402, F401 (shared with tests)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("data") / "images")


COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]


def make_npz(path: Path, per_class=(20, 30, 10), size=8) -> Path:
    """An .npz in cifar10-5k's format: class c is a noisy image of colour c; class sizes differ so a non-balanced
    split would show."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for label, count in enumerate(per_class):
        for _ in range(count):
            noise = rng.integers(-30, 30, (size, size, 3))
            images.append(np.clip(np.array(COLOURS[label]) + noise, 0, 255).astype(np.uint8))
            labels.append(label)
    order = rng.permutation(len(images))
    np.savez(path, images=np.stack(images)[order], labels=np.array(labels, dtype=np.uint8)[order],
             class_names=np.array(["red", "green", "blue"]))
    return path


def script_main(name: str):
    """The `main(argv) -> exit code` of scripts/<name>.py, to run a script's quick cases (user errors) in this
    process instead of paying an interpreter start-up for each."""
    return runpy.run_path(str(REPO / "scripts" / f"{name}.py"), run_name=name)["main"]


@pytest.fixture(scope="session", autouse=True)
def _own_cache_root(tmp_path_factory):
    """Caches the tests do not place themselves (e.g. the timed choice of `--mixed_precision auto`) go to a folder
    of this session, not the user's ~/.cache; child processes inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLOWERS_DDPM_CACHE", str(tmp_path_factory.mktemp("cache-root")))
        yield


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_reaches_child_processes():
    """A shell without job control starts background jobs (`.ci/run &`, `nohup`) with SIGINT ignored, and children
    inherit an ignored SIGINT, so a Ctrl-C test's child would never see its Ctrl-C. Python's own handler here is
    passed on as the default action, which makes each child Python install its KeyboardInterrupt handler."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """A test that runs a command in this process may leave its SIGINT/SIGTERM handling behind (an ignored SIGINT is
    even inherited by the child processes later tests start); give every test the handlers it started with."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; a test that runs several commands in this process resets them
    between commands."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A CPU run lowers PyTorch's threads when other processes keep cores busy (--cpu_threads auto); the next test
    starts from the same number as every other."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """Give each in-process run a fresh accelerate state."""
    yield
    reset_accelerate()


def resume_from_copy(data: Path, straight: Path, resumed: Path, step: int, **flags) -> int:
    """Copy `straight`'s checkpoint at `step` into the fresh output folder `resumed` and resume the same tiny
    training there (a run that was stopped at `step`); returns the exit code."""
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / f"checkpoint-{step}", resumed / "checkpoints" / f"checkpoint-{step}")
    return main(["train", *tiny_train_args(data, resumed, resume_from_checkpoint="latest", **flags)])


def run_command(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command in a fresh process (exit codes, signals, accelerate launch)."""
    # PYTHONPATH makes child processes import this checkout (not whatever `pip install -e` pointed at)
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONPATH": pythonpath, **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)


def free_port() -> int:
    """A free local port for a test's `accelerate launch` of two processes: two such tests (or a test and anything
    else on the machine) never share accelerate's default port 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flowers_ddpm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "flowers_ddpm.cli", *args], env=env)


# Loads sys.argv[1] with plain diffusers in a process where flowers_ddpm cannot be imported: run with `python -I` (no
# PYTHONPATH, no script folder, no user site) in a folder outside the repository, and blocked in sys.modules, since
# the shared environment may hold an editable install of it.
PLAIN_DIFFUSERS_LOAD = """import sys
sys.modules["flowers_ddpm"] = None
try:
    import flowers_ddpm
except ImportError:
    pass
else:
    raise SystemExit("flowers_ddpm is importable")
import numpy as np, torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
"""


def in_plain_diffusers(script: str, pipeline: Path, tmp_path: Path):
    """Run PLAIN_DIFFUSERS_LOAD + `script` (which has `pipe` and saves an array to sys.argv[2]) on `pipeline`, offline;
    returns the array."""
    out = tmp_path / "remote.npy"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-I", "-c", PLAIN_DIFFUSERS_LOAD + script, str(pipeline), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(out)
