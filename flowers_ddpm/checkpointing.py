"""Checkpoints under <output_dir>/checkpoints/checkpoint-<step>/ written with `accelerator.save_state`.

A checkpoint is written into `checkpoint-<step>.tmp`, completed with a `COMPLETE` marker and only then renamed,
so `latest` never picks a half-written one and rotation never deletes the last complete checkpoint first.
Each process also stores its data-stream position in `data_state_rank<r>.pkl` (ranks stream different shards).
"""

from __future__ import annotations

import logging
import pickle
import re
import shutil
from pathlib import Path
from typing import Optional

from .errors import UserError

logger = logging.getLogger(__name__)
MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_root(output_dir)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _NAME.match(path.name)
            if match and (path / MARKER).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume_path(output_dir: str | Path, value: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: None (fresh run), the newest complete one for 'latest', or a given path."""
    if not value:
        return None
    if value == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            logger.warning("no complete checkpoint in %s; starting a new run", checkpoints_root(output_dir))
            return None
        return found[-1][1]
    path = Path(value)
    if not path.is_dir():
        # diffusers' script also accepts a bare checkpoint name relative to the output dir
        candidate = checkpoints_root(output_dir) / value
        if candidate.is_dir():
            path = candidate
        else:
            raise UserError(f"resume_from_checkpoint {value} does not exist")
    if not (path / MARKER).is_file():
        raise UserError(f"resume_from_checkpoint {value} is not a complete checkpoint (no {MARKER} marker)")
    return path


def save_checkpoint(accelerator, output_dir: str | Path, step: int, data_state: dict,
                    total_limit: Optional[int] = None) -> Path:
    """Write a complete checkpoint for `step` on all processes; returns its final path."""
    root = checkpoints_root(output_dir)
    final, tmp = root / f"checkpoint-{step}", root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    with open(tmp / f"data_state_rank{accelerator.process_index}.pkl", "wb") as f:
        pickle.dump(data_state, f)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / MARKER).write_text(f"step={step}\nnum_processes={accelerator.num_processes}\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if total_limit:
            for _, old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> Optional[dict]:
    """Restore everything `save_checkpoint` wrote; returns this process's data state (None if not stored)."""
    accelerator.load_state(str(path))
    data_file = path / f"data_state_rank{accelerator.process_index}.pkl"
    if not data_file.is_file():
        return None
    with open(data_file, "rb") as f:
        state = pickle.load(f)
    if state.get("world_size") != accelerator.num_processes:
        return None
    return state
