"""Markdown tables, for every report that writes one (evaluate's metrics, a sweep's comparison, the recipe
ablation, the model card's metrics)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]],
                   cell: Optional[Callable[[str, Any], str]] = None, right_aligned: Sequence[str] = ()) -> str:
    """One line per row: `columns` are (key in the row, title) pairs, `cell(key, value)` formats a value (default:
    `str`), the columns whose keys are in `right_aligned` are right-aligned (numbers)."""
    cell = cell or (lambda key, value: str(value))
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "| " + " | ".join("---:" if key in right_aligned else "---" for key, _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(key, row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# The columns of a metrics table (evaluate's metrics.md and the console, the model card): key in a result row, title.
METRIC_COLUMNS = (("fid", "FID"), ("kid_mean", "KID"), ("is_mean", "IS"), ("precision", "precision"),
                  ("recall", "recall"), ("fd_dinov2", "FD-DINOv2"), ("images_per_sec", "images/s"))


def metrics_table(rows: Sequence[dict]) -> str:
    """Metric results as a markdown table: sampler, steps, then each metric present in the rows."""
    metrics = [(key, title) for key, title in METRIC_COLUMNS if any(key in row for row in rows)]
    return markdown_table(rows, [("scheduler", "sampler"), ("steps", "steps"), *metrics], _metric_cell,
                          right_aligned=["steps", *(key for key, _ in metrics)])


def ranking_table(rows: Sequence[dict]) -> str:
    """Several models' metric rows (each with a "model" key), in the given order: model, sampler, steps, metrics."""
    metrics = [(key, title) for key, title in METRIC_COLUMNS if any(key in row for row in rows)]
    return markdown_table(rows, [("model", "model"), ("scheduler", "sampler"), ("steps", "steps"), *metrics],
                          lambda key, value: f"`{value}`" if key == "model" else _metric_cell(key, value),
                          right_aligned=["steps", *(key for key, _ in metrics)])


def _metric_cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("scheduler", "steps"):
        return str(value)
    if key.startswith("kid"):
        return f"{value:.5f}"
    return f"{value:.3f}" if key in ("precision", "recall") else f"{value:.2f}"
