"""Writing files and folders so that a reader, or a run resumed after a crash, never sees them half-written.

A file is written as `<name>.tmp` beside it and renamed over it (`os.replace`, atomic on POSIX and Windows). A
folder is filled as `<name>.tmp` (or a name the caller gives) and then swapped into place: an existing folder is
renamed to `<name>.old` first and deleted after, so the final name only ever names a complete folder. An error
while writing removes the temporary file or folder and leaves the old version untouched; a killed process may
leave a `.tmp` / `.old` behind, which the next write of the same name removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional


def tmp_path(path: Path) -> Path:
    """`<path>.tmp`: where a file or folder is written before it takes its final name."""
    return path.with_name(path.name + ".tmp")


def fsync_file(path: Path) -> None:
    """Flush a file's content to the disk (so a power loss after a later rename cannot leave it empty)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to (for writers that take a file name); when the block
    ends it replaces `path` in one step (fsynced first when `durable`). On an error it is removed instead."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = False) -> None:
    """Replace `path` with `data` in one step (see `atomic_file`)."""
    with atomic_file(path, durable) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, durable: bool = False) -> None:
    """Replace `path` with `text` in one step (see `atomic_file`)."""
    with atomic_file(path, durable) as tmp:
        tmp.write_text(text)


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the complete folder `tmp` to `path`; an existing `path` becomes `<name>.old` first and is deleted after
    (a crash between the two renames leaves the old version as `<name>.old` and nothing at `path`)."""
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: str | Path, tmp: Optional[Path] = None, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a new, empty folder (`tmp`, default `<path>.tmp`) to fill; when the block ends it becomes `path` (see
    `move_into_place`). `keep_existing`: a `path` that exists by then was written by another process with the same
    content, so it stays and the new folder is dropped. On an error the new folder is removed and `path` is
    untouched."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else tmp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_existing and path.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        move_into_place(tmp, path)


@contextlib.contextmanager
def atomic_files_into(folder: str | Path, staging_name: str) -> Iterator[Path]:
    """Yield an empty staging folder `<folder>/<staging_name>` to fill; when the block ends each of its files
    replaces its namesake in `folder` in one step, for output that shares its folder with other files (a reader
    never sees a half-written file, though for an instant it may see old and new files side by side)."""
    folder = Path(folder)
    staging = folder / staging_name
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        for path in staging.iterdir():
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
