"""Crash-safe checkpoints under <output_dir>/checkpoints/checkpoint-<step>/.

Writing: every process writes into `checkpoint-<step>.tmp` (accelerate's `save_state` for model, optimizer and
RNG states; our JSON/safetensors files for the rest), then the main process fsyncs every file, records its size
and sha256 in `MANIFEST.json`, writes the `COMPLETE` marker last and renames the folder. A checkpoint is
therefore either invisible (no final name, or no marker) or complete, and its manifest tells whether a file was
truncated or altered later. Rotation deletes old checkpoints only after the new one is complete, counts only
intact ones, never deletes the one just written, and moves damaged ones to `checkpoints/damaged/` (warned).

Folders this run did not write are never overwritten or deleted: a `checkpoint-<step>` folder without the marker
(another tool's, or an older layout) or, for a new run, another run's checkpoints are refused at start-up unless
`--overwrite_output_dir`, which replaces them.

Reading: `latest` picks the newest checkpoint whose manifest verifies (others are skipped with a warning); when
there are checkpoints but none verifies it refuses (unless `--overwrite_output_dir` asks for a fresh start); an
explicitly named checkpoint that does not verify is refused. Resuming with settings that change the model or
the diffusion process (architecture, resolution, prediction type ...) is refused before anything is loaded.

Formats: weights are safetensors; our own state is JSON (bytes in the shuffle buffer are base64). The only
pickles are accelerate's `optimizer.bin` and `random_states_<r>.pkl`, which accelerate loads with
`torch.load(weights_only=True)`. accelerate skips random states it cannot restore with an INFO log; a resume
without them would not be exact, so loading checks that they were restored and refuses the checkpoint otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from accelerate.utils import load as accelerate_load
from accelerate.utils.constants import RNG_STATE_NAME

from .._util.atomic import atomic_write_text, fsync_file, move_into_place
from .._util.distributed import together
from ..errors import StorageError, UserError, storage_fault

logger = logging.getLogger(__name__)
MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
CONFIG_FILE = "training_config.json"
DAMAGED_DIR = "damaged"  # under checkpoints/: damaged checkpoints set aside by rotation
_NAME = re.compile(r"^checkpoint-(\d+)$")
_verified: set[Path] = set()  # checkpoints this process wrote or verified (rotation verifies each only once)

# Settings that change what the weights mean; resuming with a different value is refused. Everything else
# (logging, checkpoint interval, max steps, learning rate ...) may change on resume.
RESUME_SENSITIVE_SETTINGS = ("model_preset", "unet_config", "resolution", "prediction_type", "ddpm_num_steps",
                             "ddpm_beta_schedule", "use_ema", "learn_sigma", "class_conditional")


class CorruptCheckpoint(Exception):
    """A checkpoint folder whose files do not match its manifest."""


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every folder named checkpoint-<step>, complete or not, oldest first."""
    root = checkpoints_root(output_dir)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _NAME.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    return sorted(found)


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint that carries the COMPLETE marker, oldest first (not yet verified)."""
    return [(step, path) for step, path in checkpoint_folders(output_dir) if (path / MARKER).is_file()]


def foreign_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-<step> folders without the COMPLETE marker: written by another tool or an older layout (our saves
    give a folder its final name only after the marker is in it)."""
    return [path for _, path in checkpoint_folders(output_dir) if not (path / MARKER).is_file()]


def check_output_dir(output_dir: str | Path, resuming: bool, overwrite: bool) -> None:
    """Refuse (one line) to write where this run would overwrite or delete folders it did not write: another tool's
    checkpoint-<step> folder, or, for a new run, another run's checkpoints. `overwrite` (--overwrite_output_dir)
    allows it: they are then replaced."""
    if overwrite:
        return
    foreign = foreign_checkpoints(output_dir)
    if foreign:
        raise UserError(f"{foreign[0]} has no {MARKER} marker: it was not written by flowers-ddpm (or by an older "
                        "version), and this run will not overwrite or delete it; use another --output_dir, or pass "
                        "--overwrite_output_dir to replace it")
    existing = checkpoint_folders(output_dir)
    if existing and not resuming:
        names = ", ".join(path.name for _, path in existing)
        raise UserError(f"{checkpoints_root(output_dir)} holds another run's checkpoints ({names}); continue it with "
                        "--resume_from_checkpoint latest, use another --output_dir, or pass --overwrite_output_dir "
                        "to replace them with a new run")


def remove_checkpoints(output_dir: str | Path) -> None:
    """A new run with --overwrite_output_dir: remove the checkpoint-<step> folders already there (main process), so
    that neither `latest` nor rotation ever mixes them with the new run's."""
    found = checkpoint_folders(output_dir)
    for _, path in found:
        doomed = path.with_name(path.name + ".deleting")  # rename first: never a half-deleted checkpoint
        path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    if found:
        logger.warning("removed %d checkpoint folder(s) of a previous run from %s (--overwrite_output_dir)",
                       len(found), checkpoints_root(output_dir))


# -- manifest ------------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record size and sha256 of every file in `folder` (after fsyncing it) in MANIFEST.json."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        fsync_file(path)
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    atomic_write_text(folder / MANIFEST, json.dumps({"files": files}, indent=1), durable=True)


def verify_checkpoint(folder: Path) -> None:
    """Raise CorruptCheckpoint unless the marker and manifest exist and every listed file matches."""
    if not (folder / MARKER).is_file():
        raise CorruptCheckpoint(f"no {MARKER} marker")
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CorruptCheckpoint(f"unreadable {MANIFEST} ({type(e).__name__})") from None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{name} is missing")
        if path.stat().st_size != expected["size"]:
            raise CorruptCheckpoint(f"{name} has {path.stat().st_size} bytes, expected {expected['size']}")
        if _sha256(path) != expected["sha256"]:
            raise CorruptCheckpoint(f"{name} does not match its sha256")


# -- choosing what to resume from ----------------------------------------------------------------------------------
def resolve_resume_path(output_dir: str | Path, value: Optional[str], fresh_start_allowed: bool = False
                        ) -> Optional[Path]:
    """The checkpoint to resume from: None (fresh run), the newest verified one for 'latest', or a given path.

    'latest' with checkpoints none of which can be resumed is refused in one line naming them, unless
    `fresh_start_allowed` (--overwrite_output_dir): then a warning says so and a new run starts."""
    if not value:
        return None
    if value == "latest":
        unusable = []
        for step, path in reversed(complete_checkpoints(output_dir)):
            try:
                verify_checkpoint(path)
                return path
            except CorruptCheckpoint as e:
                logger.warning("ignoring damaged checkpoint %s: %s", path, e)
                unusable.append(f"{path.name}: {e}")
        unusable += [f"{path.name}: no {MARKER} marker" for path in foreign_checkpoints(output_dir)]
        root = checkpoints_root(output_dir)
        if not unusable:
            logger.warning("no complete checkpoint in %s; starting a new run", root)
            return None
        summary = f"none of the checkpoints in {root} can be resumed ({'; '.join(unusable)})"
        if fresh_start_allowed:
            logger.warning("%s; starting a new run from step 0 (--overwrite_output_dir)", summary)
            return None
        raise UserError(f"{summary}; repair or move them, use another --output_dir, or pass --overwrite_output_dir "
                        "to start a new run from step 0 here")
    path = Path(value)
    if not path.is_dir():
        # diffusers' script also accepts a bare checkpoint name relative to the output dir
        candidate = checkpoints_root(output_dir) / value
        if candidate.is_dir():
            path = candidate
        else:
            raise UserError(f"resume_from_checkpoint {value} does not exist")
    try:
        verify_checkpoint(path)
    except CorruptCheckpoint as e:
        raise UserError(f"resume_from_checkpoint {value} is not a complete, intact checkpoint: {e}") from None
    return path


def check_compatible(path: Path, settings: dict) -> None:
    """Refuse to resume when a setting that changes the meaning of the weights differs from the checkpoint's."""
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        logger.warning("checkpoint %s does not record its settings; cannot check that they match", path)
        return
    saved = json.loads(config_file.read_text())
    differing = [k for k in RESUME_SENSITIVE_SETTINGS if k in saved and saved[k] != settings.get(k)]
    if bool(saved.get("augment_p")) != bool(settings.get("augment_p")):  # with or without the augment layer
        differing.append("augment_p")
    # with or without the learned loss weights' network and optimizer (files of the checkpoint; older
    # checkpoints, written before the setting existed, have neither)
    if bool(saved.get("learned_loss_weights")) != bool(settings.get("learned_loss_weights")):
        differing.append("learned_loss_weights")
    if differing:
        details = ", ".join(f"{k} (checkpoint: {saved.get(k)!r}, now: {settings.get(k)!r})" for k in differing)
        raise UserError(f"cannot resume from {path}: these settings differ from the checkpoint's: {details}")


# -- JSON with bytes -------------------------------------------------------------------------------------------------
# The data state holds raw records (which may be encoded image bytes) and numpy RNG states; JSON keeps it readable
# without pickle. Bytes become {"__bytes__": base64}; tuples come back as lists, which datasets accepts.
def _encode(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, int, float, bool)):  # numpy scalars
        return value.item()
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__bytes__"}:
            return base64.b64decode(value["__bytes__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def dump_json(value: Any, path: Path) -> None:
    """Write `value` (dicts, lists, numbers, strings, bytes) as JSON."""
    path.write_text(json.dumps(_encode(value)))


def load_json(path: Path) -> Any:
    return _decode(json.loads(path.read_text()))


# -- saving and loading --------------------------------------------------------------------------------------------
def save_checkpoint(accelerator, output_dir: str | Path, step: int, data_state: dict, write_extra,
                    settings: Optional[dict] = None, total_limit: Optional[int] = None) -> Path:
    """Write a complete checkpoint for `step` on all processes; returns its final path.

    `write_extra(folder)` is called on the main process to add the trainer's own files (JSON, safetensors).
    When the disk refuses a write (full, read-only, no permission) on any process, the partial folder is removed
    and every process raises the StorageError that names it and the checkpoint that was kept.
    """
    root = checkpoints_root(output_dir)
    final, tmp = root / f"checkpoint-{step}", root / f"checkpoint-{step}.tmp"
    main = accelerator.is_main_process

    def prepare():
        if main:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob("checkpoint-*.*"):  # leftovers of saves or deletions cut short by a crash
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write():
        accelerator.save_state(str(tmp))
        dump_json(data_state, tmp / f"data_state_rank{accelerator.process_index}.json")
        if main:
            write_extra(tmp)
            if settings is not None:
                (tmp / CONFIG_FILE).write_text(json.dumps(settings, indent=1, default=str))

    def seal():
        if main:
            write_manifest(tmp)
            atomic_write_text(tmp / MARKER, f"step={step}\nnum_processes={accelerator.num_processes}\n", durable=True)
            move_into_place(tmp, final)
            _verified.add(final)
            if total_limit:
                rotate_checkpoints(output_dir, final, total_limit)

    def attempt(stage):  # this process's part; a write the disk refused becomes the StorageError naming what was kept
        try:
            stage()
        except Exception as e:
            fault = storage_fault(e, tmp)
            if fault is None:
                raise
            raise StorageError(f"{fault} while writing {tmp} (removed); {kept_checkpoint(output_dir)}; free space or "
                               "fix the permissions, then rerun with --resume_from_checkpoint latest") from e

    try:
        for stage in (prepare, write, seal):  # each ends where every process has finished its part
            with together(accelerator):
                attempt(stage)
    except Exception:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def kept_checkpoint(output_dir: str | Path) -> str:
    """'checkpoint-N is intact' for the newest complete checkpoint, for messages about a failed write."""
    found = complete_checkpoints(output_dir)
    return f"{found[-1][1]} is intact" if found else "no checkpoint was written yet"


def _set_aside(path: Path, reason: Exception) -> None:
    folder = path.parent / DAMAGED_DIR
    folder.mkdir(exist_ok=True)
    target, n = folder / path.name, 1
    while target.exists():
        target, n = folder / f"{path.name}.{n}", n + 1
    path.rename(target)
    logger.warning("checkpoint %s is damaged (%s): moved to %s; it is not counted by --checkpoints_total_limit",
                   path, reason, target)


def rotate_checkpoints(output_dir: str | Path, newest: Path, total_limit: int) -> None:
    """Keep the newest `total_limit` intact checkpoints, never deleting `newest` (the one just written); damaged
    ones are moved to checkpoints/damaged/ with a warning instead of being counted (main process)."""
    intact = []
    for _, path in complete_checkpoints(output_dir):
        if path not in _verified:
            try:
                verify_checkpoint(path)
            except CorruptCheckpoint as e:
                _set_aside(path, e)
                continue
            _verified.add(path)
        intact.append(path)
    for old in [p for p in intact if p != newest][:max(0, len(intact) - total_limit)]:
        doomed = old.with_name(old.name + ".deleting")  # rename first: never a half-deleted checkpoint
        old.rename(doomed)
        _verified.discard(old)
        shutil.rmtree(doomed, ignore_errors=True)


def saved_num_processes(path: Path) -> Optional[int]:
    """The number of processes that wrote a checkpoint (from its marker), None when it does not say."""
    try:
        fields = dict(line.split("=", 1) for line in (path / MARKER).read_text().split() if "=" in line)
        return int(fields["num_processes"])
    except (OSError, KeyError, ValueError):
        return None


def _random_states_restored(states: dict) -> bool:
    """Whether the RNGs accelerate sets (Python, numpy, torch CPU and CUDA) now hold `states`."""
    saved_np, current_np = states["numpy_random_seed"], np.random.get_state()
    same = (random.getstate() == tuple(states["random_state"])
            and saved_np[0] == current_np[0] and np.array_equal(saved_np[1], current_np[1])
            and tuple(saved_np[2:]) == tuple(current_np[2:])
            and torch.equal(torch.get_rng_state(), states["torch_manual_seed"]))
    if same and torch.cuda.is_available():
        saved_cuda, current_cuda = states["torch_cuda_manual_seed"], torch.cuda.get_rng_state_all()
        same = len(saved_cuda) == len(current_cuda) and all(map(torch.equal, saved_cuda, current_cuda))
    return same


def check_random_states(accelerator, path: Path) -> None:
    """Right after `accelerator.load_state(path)`: raise a UserError unless this process's random states were
    restored (accelerate skips ones it cannot load, e.g. a CPU checkpoint resumed on a GPU, with an INFO log).
    A checkpoint of another number of processes restarts the data stream anyway (warned), so only warn there."""
    name = f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    saved = saved_num_processes(path)
    if saved != accelerator.num_processes:
        logger.warning("checkpoint %s was written by %s process(es), this run has %d: random states are restored "
                       "only for the process indices it saved", path,
                       saved if saved is not None else "an unknown number of", accelerator.num_processes)
        return
    try:
        restored = _random_states_restored(accelerate_load(path / name))
        reason = "it holds other states than the ones now set"
    except Exception as e:  # a missing file, key or type: whatever accelerate tripped on
        restored, reason = False, f"{type(e).__name__}: {e}"
    if not restored:
        raise UserError(f"cannot resume exactly from {path}: {name} (the random states of process "
                        f"{accelerator.process_index}) cannot be restored ({reason}); resume on the kind of device "
                        "that wrote it, or start a new run with another --output_dir")


def load_checkpoint(accelerator, path: Path) -> Optional[dict]:
    """Restore accelerate's state; returns this process's data state (None if stored for another world size)."""
    accelerator.load_state(str(path))  # optimizer and RNG pickles are read with weights_only=True by accelerate
    check_random_states(accelerator, path)  # nothing may draw random numbers in between
    data_file = path / f"data_state_rank{accelerator.process_index}.json"
    if not data_file.is_file():
        return None
    state = load_json(data_file)
    if state.get("world_size") != accelerator.num_processes:
        return None
    return state
