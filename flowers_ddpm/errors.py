"""The exception types for problems a user can fix (bad config, bad data, missing files, no network, a full or
read-only disk), and how a failed write is recognised as the disk's refusal."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Optional

EXIT_STORAGE = 74  # EX_IOERR: the disk refused a write (full, read-only, no permission); what was kept is named


class UserError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits non-zero.

    `reported` marks an error that every process of a multi-process launch raises together, already printed by
    the main process (flowers_ddpm._util.distributed.fail_together); every process exits with its code."""

    exit_code = 2
    reported = False


class StorageError(UserError):
    """A save or export the disk refused: one line naming the path and what was kept, exit code 74."""

    exit_code = EXIT_STORAGE


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# writers that report the OS error only in their message (safetensors' Rust IoError, torch's zip writer)
_STORAGE_MESSAGES = {"no space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC,
                     "disk quota exceeded": errno.EDQUOT, "read-only file system": errno.EROFS,
                     "os error 30": errno.EROFS, "permission denied": errno.EACCES, "os error 13": errno.EACCES}
_NEARLY_FULL = 1 << 20  # bytes


def storage_fault(error: BaseException, path: str | Path) -> Optional[str]:
    """Why writing under `path` failed when the disk refused it ('no space left on device', 'read-only file
    system', 'permission denied' ...), else None. Looks at the errno of the error and its causes, at the message of
    writers that hide the errno, and, for torch's zip writer (a full disk reads 'unexpected pos ...'), at the free
    space left on the file system."""
    seen: set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _STORAGE_ERRNOS:
            return os.strerror(current.errno).lower()
        text = str(current).lower()
        for fragment, code in _STORAGE_MESSAGES.items():
            if fragment in text:
                return os.strerror(code).lower()
        current = current.__cause__ or current.__context__
    if isinstance(error, RuntimeError):
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            if shutil.disk_usage(folder).free < _NEARLY_FULL:
                return os.strerror(errno.ENOSPC).lower()
        except OSError:
            return None
    return None


def user_error_of(error: BaseException) -> Optional[UserError]:
    """`error` as the one-line problem a user can fix: itself if it is a UserError, a StorageError for a write
    the disk refused ('no space left on device: PATH'), else None (our bug, which keeps its traceback)."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, OSError):
        fault = storage_fault(error, error.filename or ".")
        if fault is not None:
            return StorageError(f"{fault}: {error.filename or error}")
    return None
