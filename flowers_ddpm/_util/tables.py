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
