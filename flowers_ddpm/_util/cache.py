"""Where flowers_ddpm caches what it derives from data (decoded images, reference features), and how a cache entry
is keyed.

One root, set by one environment variable: `$FLOWERS_DDPM_CACHE`, else `$XDG_CACHE_HOME/flowers_ddpm`, else
`~/.cache/flowers_ddpm`. Each kind of cache is a folder below it (`decoded/`, `reference/`) unless its own setting
(`--decode_cache_dir`, `--reference_cache_dir`) names another folder. An entry's folder or file name is a hash of
its identity: everything its content depends on, a local folder by its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

CACHE_ENV = "FLOWERS_DDPM_CACHE"


def cache_root() -> Path:
    """$FLOWERS_DDPM_CACHE, else $XDG_CACHE_HOME/flowers_ddpm, else ~/.cache/flowers_ddpm."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flowers_ddpm"


def cache_location(kind: str, setting: Optional[str] = None) -> Path:
    """The folder of one kind of cache: `setting` when given, else `<cache_root()>/<kind>`."""
    return Path(setting) if setting else cache_root() / kind


def folder_fingerprint(folder: str | Path) -> str:
    """Hash of every file's relative path, size and modification time below `folder`: changes when a file is added,
    removed or rewritten."""
    digest = hashlib.sha256()
    root = Path(folder).resolve()
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for name in sorted(files):
            path = Path(dirpath) / name
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def identity_key(identity: dict) -> str:
    """A short name for a cache entry: the hash of its identity (a JSON-serialisable dict)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
