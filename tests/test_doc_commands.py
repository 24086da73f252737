"""Every `flowers-ddpm` command shown in README.md and docs/ is one the command line accepts (its subcommand and
flags exist and its values have the right types: stale flags in the manuals fail here), and every one that can run
offline really runs.

Runnable blocks. A fenced block on the line after `<!-- runnable -->` (an HTML comment: invisible on GitHub) is
run: each of its `flowers-ddpm` / `python -m flowers_ddpm` commands that `why_not_runnable` does not exclude, in one
temporary folder and in one chain
(prepare, train, fine-tune, train-classifier, attach-classifier and ema-reconstruct, sample, evaluate, push
--dry_run, sweep and benchmark, then resume; page order within a stage), so `--model ddpm-flowers-64/pipeline`
finds what the page's train command wrote. Lines that are not our command (`pip install`) are never run; those that
`why_not_runnable` names a reason for (`accelerate launch` of several processes, Hub access, a server,
torch.compile) are only parsed. A documented command outside runnable blocks must have such a reason, so a new
offline command cannot be left out unnoticed.

Swapped settings (TINY, appended to the documented flags; the last value of a flag wins): the data becomes a
generated folder of two classes at `path/to/images` (`--train_data_dir`, which also replaces a config's
`--dataset_name`; `configs/` is the checkout's), the model `--model_preset tiny` at `--resolution 16`, training 2
steps (4 for a resume) of batch 4 with a checkpoint at step 2 and post-hoc EMA snapshots, sampling 2 images in 2
steps, evaluation 6 images in 2 steps with the small feature network of tests/feature_nets.py and no DINOv2,
benchmarks one round of one step on 8 generated 32 px images, and `--class_labels` values become the folder's class
names. Paths (`--output_dir`, `--output`, `--json`, `--staging_dir`) stay as documented, inside the temporary folder.
"""

from __future__ import annotations

import glob
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowers_ddpm.cli import build_parser, main
from flowers_ddpm.experiments.soak import COLOURS

from .conftest import REPO, make_class_folder, reset_accelerate

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = "<!-- runnable -->"
OURS = ("flowers-ddpm ", "python -m flowers_ddpm ")
SCRIPTS = {"train.py": "train", "train_classifier.py": "train-classifier", "evaluate.py": "evaluate",
           "sweep.py": "sweep", "sample.py": "sample", "benchmark.py": "benchmark"}
DATA = "path/to/images"

_TRAINING = ["--train_data_dir", DATA, "--model_preset", "tiny", "--resolution", "16", "--train_batch_size", "4",
             "--max_train_steps", "2", "--checkpointing_steps", "2", "--save_images_steps", "100",
             "--eval_batch_size", "2", "--ddpm_num_inference_steps", "2", "--shuffle_buffer_size", "8",
             "--dataloader_num_workers", "0", "--logger", "none", "--mixed_precision", "no"]
_METRICS = ["--num_images", "6", "--steps", "2", "--batch_size", "6", "--feature_network",
            "tests.feature_nets:tiny_conv_net", "--dinov2_model", "none", "--reference_cache_dir", "reference-cache"]
TINY = {
    "prepare": ["--train_data_dir", DATA, "--resolution", "16"],
    "train": [*_TRAINING, "--phema_sigma_rel", "0.05,0.1", "--phema_snapshot_steps", "1"],
    "train-classifier": [*_TRAINING, "--classifier_eval_images", "4"],
    "sample": ["--num_images", "2", "--steps", "2", "--batch_size", "2"],
    "evaluate": _METRICS,
    "sweep": [*_TRAINING, *_METRICS],
    "benchmark": ["--rounds", "1", "--steps", "1", "--warmup_steps", "1", "--num_images", "8", "--image_size", "32",
                  "--data_resolution", "16", "--model_preset", "tiny", "--resolution", "16", "--train_batch_size",
                  "2", "--sample_batch_size", "2", "--samplers", "ddim=2", "--mixed_precision", "no", "--device",
                  "cpu"],
}
RESUME_STEPS = ["--max_train_steps", "4"]  # past the first run's 2 steps, so the resume trains


@dataclass
class Command:
    page: str
    line: int
    text: str  # as documented (continuations joined, comment dropped)
    runnable: bool

    @property
    def argv(self) -> list[str] | None:
        """The flowers-ddpm arguments (optional `[...]` parts dropped), or None for a command that is not ours."""
        text = re.sub(r"\[[^\]]*\]", "", self.text)
        for prefix in (*OURS, "accelerate launch -m flowers_ddpm "):
            if text.startswith(prefix):
                return shlex.split(text[len(prefix):])
        if text.startswith("accelerate launch") and " scripts/" in text:
            script, _, rest = text.partition(" scripts/")[2].partition(" ")
            if script in SCRIPTS:
                return [SCRIPTS[script], *shlex.split(rest)]
        return None

    @property
    def launched(self) -> bool:
        return self.text.startswith("accelerate launch")

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def fenced_blocks(page: Path) -> list[tuple[int, bool, str]]:
    """(first line, runnable, text) of each fenced block of a page."""
    lines, blocks, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1))), len(lines))
        blocks.append((i + 2, i > 0 and lines[i - 1].strip() == RUNNABLE, "\n".join(lines[i + 1:end])))
        i = end + 1
    return blocks


def documented_commands() -> list[Command]:
    """Each flowers-ddpm command (also under `accelerate launch`) in a fenced block of README.md and docs/."""
    found = []
    for page in PAGES:
        for first, runnable, text in fenced_blocks(page):
            lines = text.splitlines()
            i = 0
            while i < len(lines):
                start, command = i, lines[i]
                while command.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command = command[:-1] + " " + lines[i].strip()
                i += 1
                command = re.sub(r"\s+", " ", command.split(" #")[0]).strip()
                if "..." in re.sub(r"\[[^\]]*\]", "", command) or "<" in command:
                    continue  # a placeholder, not a command
                found.append(Command(page.name, first + start, command, runnable))
    return [command for command in found if command.argv is not None]


def why_not_runnable(command: Command) -> str | None:
    """Why a documented command is not run by test_the_runnable_commands_run (None: it can run, so its block must
    be marked runnable)."""
    argv = command.argv
    subcommand, text = argv[0], " " + command.text + " "
    if command.launched:
        return "several processes (the two-process paths have their own tests)"
    if re.search(r" --(model|init_from) google/", text):
        return "downloads a model from the Hub"
    if subcommand == "push" and "--dry_run" not in argv or "--push_to_hub" in argv:
        return "uploads to the Hub"
    if subcommand == "demo":
        return "serves a web page until stopped (tests/test_demo.py builds the page)"
    if "|" in text:
        return "a template (alternative values)"
    if subcommand == "benchmark" and "--compile" in argv:
        return "torch.compile takes minutes on a CPU"
    if "digits16" in text:
        return "reproduces a measurement on the digits bed (scripts/recipe_ablation.py makes the folder)"
    if "--search" in argv and argv[argv.index("--search") + 1] == "optuna":
        return "an Optuna study of many trials (tests/test_optuna_search.py runs and resumes a small one)"
    return None


def test_the_manuals_show_commands():
    commands = documented_commands()
    assert len(commands) >= 30 and sum(c.runnable for c in commands) >= 15


@pytest.mark.parametrize("command", documented_commands(), ids=str)
def test_every_documented_command_parses(command):
    _, unknown = build_parser().parse_known_args(command.argv)
    assert not unknown, f"{command}: flags the command does not take: {unknown}"


def test_every_command_that_can_run_offline_is_in_a_runnable_block():
    missing = [str(c) for c in documented_commands() if not c.runnable and why_not_runnable(c) is None]
    assert not missing, f"mark these blocks {RUNNABLE} (or give why_not_runnable a reason): {missing}"


def _stage(argv: list[str]) -> int:
    """The chain's order: what a command reads is written by an earlier stage."""
    subcommand = argv[0]
    if subcommand == "train":
        return 9 if "--resume_from_checkpoint" in argv else 2 if "--init_from" in argv else 1
    return {"prepare": 0, "train-classifier": 3, "attach-classifier": 4, "ema-reconstruct": 4, "sample": 5,
            "evaluate": 6, "push": 7, "sweep": 8, "benchmark": 8}[subcommand]


def tiny(argv: list[str]) -> list[str]:
    """The documented arguments with TINY appended (and --class_labels values replaced by the folder's classes)."""
    argv, names = list(argv), list(COLOURS)
    if "--class_labels" in argv:
        i = argv.index("--class_labels") + 1
        j = i
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        argv[i:j] = [names[k % len(names)] for k in range(j - i)]
    resume = RESUME_STEPS if argv[0] == "train" and "--resume_from_checkpoint" in argv else []
    return [*argv, *TINY.get(argv[0], []), *resume]


def shell_glob(arg: str) -> list[str]:
    """What the shell makes of one argument: a pattern becomes its matches (sorted), unless nothing matches."""
    return sorted(glob.glob(arg)) or [arg] if any(c in arg for c in "*?[") else [arg]


@pytest.mark.slow
def test_the_runnable_commands_run(tmp_path, monkeypatch):
    """One chain through every runnable block, in one folder (about a minute on 2 CPU cores)."""
    make_class_folder(tmp_path / DATA)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLOWERS_DDPM_CACHE", str(tmp_path / "cache"))  # the decode-once cache of prepare
    runnable = sorted((c for c in documented_commands() if c.runnable and why_not_runnable(c) is None),
                      key=lambda c: _stage(c.argv))
    assert {c.argv[0] for c in runnable} >= {"prepare", "train", "sample", "evaluate", "push", "sweep", "benchmark",
                                             "train-classifier", "attach-classifier", "ema-reconstruct"}
    for command in runnable:
        argv = [expanded for arg in tiny(command.argv) for expanded in shell_glob(arg)]
        code = main(argv)
        reset_accelerate()
        assert code == 0, f"{command}\n  ran as: flowers-ddpm {shlex.join(argv)}\n  exit code {code}"
    # what the pages say the chain leaves behind
    written = ["grid.png", "samples", "metrics.json", "metrics.md", "to-upload/README.md", "adm-flowers-64-guided",
               "ddpm-flowers-64/ema-reconstruct/sigma_rel-0.08", "ema-ranking.json", "sweep-lr-pred/results.md", "bench.json",
               "ddpm-tiny/checkpoints/checkpoint-4"]  # the resume continued to step 4
    assert not [name for name in written if not (tmp_path / name).exists()], sorted(p.name for p in tmp_path.iterdir())
