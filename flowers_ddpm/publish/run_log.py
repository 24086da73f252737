"""The run log <output_dir>/report/loss.jsonl: one JSON object per logged optimizer step (step, loss, lr,
images_per_sec, ema_decay when EMA is on, nonfinite_steps), appended by the trainer's main process.

The one place that knows its name and format: the trainer writes through `append_record`; the training report,
the sweep and the recipe ablation read through `read_records` / `loss_curve`. A resumed run logs again the steps
after its checkpoint, so a step may appear twice; readers see its later record.
"""

from __future__ import annotations

import json
from pathlib import Path

LOSS_LOG = "loss.jsonl"


def log_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "report" / LOSS_LOG


def append_record(output_dir: str | Path, record: dict) -> None:
    """Append one step's values (a dict with "step") as a JSON line."""
    with open(log_path(output_dir), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(output_dir: str | Path) -> list[dict]:
    """The logged records, one per step in step order (a resumed run's later record for a step wins); [] when
    nothing was logged."""
    path = log_path(output_dir)
    by_step: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def loss_curve(output_dir: str | Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of the logged records."""
    records = read_records(output_dir)
    return [r["step"] for r in records], [r["loss"] for r in records]
