"""Every `flowers-ddpm` command shown in README.md and docs/ is one the command line accepts: its subcommand and
flags exist and its values have the right types (stale flags in the manuals fail here)."""

from __future__ import annotations

import re
import shlex

import pytest

from flowers_ddpm.cli import build_parser

from .conftest import REPO

FENCE = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.S)
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for each flowers-ddpm / python -m flowers_ddpm command in a fenced block."""
    found = []
    for page in PAGES:
        for block in FENCE.findall(page.read_text()):
            for command in block.replace("\\\n", " ").splitlines():
                command = command.split(" #")[0].strip()
                command = re.sub(r"\[[^\]]*\]", "", command)  # [--optional] parts
                if "..." in command or "<" in command:
                    continue  # a placeholder, not a command
                for prefix in ("flowers-ddpm ", "python -m flowers_ddpm ", "accelerate launch -m flowers_ddpm "):
                    if command.startswith(prefix):
                        found.append((page.name, command[len(prefix):]))
                if command.startswith("accelerate launch") and " scripts/" in command:
                    script, _, rest = command.partition(" scripts/")[2].partition(" ")
                    subcommand = {"train.py": "train", "train_classifier.py": "train-classifier",
                                  "evaluate.py": "evaluate", "sweep.py": "sweep", "sample.py": "sample",
                                  "benchmark.py": "benchmark"}.get(script)
                    if subcommand:
                        found.append((page.name, f"{subcommand} {rest}"))
    return found


def test_the_manuals_show_commands():
    assert len(documented_commands()) >= 20


@pytest.mark.parametrize("page, command", documented_commands())
def test_every_documented_command_parses(page, command):
    args, unknown = build_parser().parse_known_args(shlex.split(command))
    assert not unknown, f"{page}: `{command}` has flags the command does not take: {unknown}"
