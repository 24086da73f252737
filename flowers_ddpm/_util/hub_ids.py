"""Telling a Hugging Face Hub repo id from a local path, for every setting that takes either (`--model`,
`init_from`, the paths a model card shows)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


def is_hub_id(text: Optional[str], namespaced: bool = False) -> bool:
    """Whether `text` names a Hub repo: huggingface_hub accepts it as a repo id (`name` or `namespace/name`: no
    leading '.', '/' or '~', no deeper path) and no local file or folder of that name exists. `namespaced`: only
    `namespace/name` (what a model card links as its base model)."""
    if not text or (namespaced and "/" not in text):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return not Path(text).exists()


RUN_FOLDERS = ("pipeline", "best")  # the pipeline folders of a training run's output_dir


def shown_name(text: str) -> str:
    """What published files (metrics, model cards) show of a Hub id or local path: a Hub id as it is, a local path
    as its last component (with its run folder's for a run's pipeline/ or best/), never the folders above it."""
    if is_hub_id(text):
        return text
    path = Path(text).resolve()
    if path.name in RUN_FOLDERS and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or str(text)
