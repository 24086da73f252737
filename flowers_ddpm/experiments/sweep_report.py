"""The comparison a sweep writes from its trials' result.json files: results.md, results.csv and results.png."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from .._util.tables import markdown_table

# (key in the flattened row, column title); grid settings come first, after the trial name
RESULT_COLUMNS = (("final_loss", "final loss"), ("fid", "FID"), ("kid_mean", "KID"), ("kid_std", "KID std"),
                  ("train_images_per_sec", "train images/s"), ("sample_images_per_sec", "sample images/s"))


def flatten(result: dict) -> dict:
    """One trial's result.json as a flat row: trial, settings, final loss, metrics, throughput."""
    metrics = result["metrics"]
    return {"trial": result["trial"], **result["settings"], "status": result.get("status", "complete"),
            "ema_sigma_rel": result.get("ema_sigma_rel"),
            "final_loss": result["final_loss"],
            "fid": metrics.get("fid"), "kid_mean": metrics.get("kid_mean"), "kid_std": metrics.get("kid_std"),
            "train_images_per_sec": result["train_images_per_sec"],
            "sample_images_per_sec": metrics.get("images_per_sec")}


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if key.startswith("kid"):
            return f"{value:.5f}"
        if key in ("final_loss",):
            return f"{value:.4f}"
        return f"{value:.2f}" if key in dict(RESULT_COLUMNS) else f"{value:.4g}"  # settings: 4 digits (CSV: all)
    return str(value)


def markdown(rows: list[dict], keys: list[str]) -> str:
    """A markdown table, one row per trial, best FID marked in bold."""
    fids = [row["fid"] for row in rows if row["fid"] is not None]
    best = min(fids) if fids else None

    def cell(key: str, value) -> str:
        text = _cell(key, value)
        return f"**{text}**" if key == "fid" and best is not None and value == best else text

    columns = [("trial", "trial"), *((key, key) for key in keys), *RESULT_COLUMNS]
    return markdown_table(rows, columns, cell, right_aligned=[key for key, _ in RESULT_COLUMNS])


def write_csv(rows: list[dict], keys: list[str], path: Path) -> None:
    """The same table as CSV (full precision), for spreadsheets and pandas."""
    columns = ["trial", *keys, *(k for k, _ in RESULT_COLUMNS)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: row[k] for k in columns} for row in rows)


def plot(rows: list[dict], keys: list[str], path: Path) -> Path:
    """FID and final loss per trial, as two bar charts labelled with each trial's settings."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    labels = ["\n".join(_cell(k, row[k]) for k in keys) for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.3 * len(rows) * 2), 4), dpi=100)
    for ax, (key, title) in zip(axes, (("fid", "FID (lower is better)"), ("final_loss", "final training loss"))):
        values = [row[key] if row[key] is not None else float("nan") for row in rows]
        ax.bar(range(len(rows)), values, color="tab:blue" if key == "fid" else "tab:orange")
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.supxlabel(", ".join(keys), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_comparison(results: list[dict], keys: list[str], folder: Path, title: Optional[str] = None,
                     with_status: bool = False, with_ema: bool = False) -> Path:
    """Write results.md, results.csv and results.png in `folder`; returns the markdown path. `with_status`: a
    column saying whether each trial completed or was pruned (and at which step), for an Optuna search;
    `with_ema`: the post-hoc EMA length whose FID is the trial's (sweep --ema_sigma_rel)."""
    rows = [flatten(result) for result in results]
    columns = keys + ["status"] * with_status + ["ema_sigma_rel"] * with_ema
    md_path = folder / "results.md"
    md_path.write_text(f"{title or 'Sweep over ' + ', '.join(keys)} ({len(rows)} trials)\n\n" + markdown(rows, columns))
    write_csv(rows, columns, folder / "results.csv")
    plot(rows, keys, folder / "results.png")
    return md_path
