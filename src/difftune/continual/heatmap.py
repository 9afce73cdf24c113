"""The heat map of a task sequence's scores: rows are the models after each stage, columns the tasks."""

from __future__ import annotations

import io
from pathlib import Path

from difftune.continual.measures import ScoreMatrix
from difftune.io.atomic import atomic_write_bytes

MISSING = "#d9d9d9"  # the colour of a cell that was not measured


def _row_label(i: int, stage: str) -> str:
    return "source model" if i == 0 else f"after {stage}"


def heat_map_png(m: ScoreMatrix) -> bytes:
    """The scores of ``m`` as a PNG heat map: one row per stage done, one column per task.

    Each measured cell shows its value with one decimal; a cell not measured is grey and blank. The
    colours run from light (low, better) to dark (high, worse). Matplotlib (Agg) is imported here only.
    """
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    rows, cols = len(m.stages), len(m.tasks)
    values = np.ma.masked_invalid(
        np.array([[np.nan if v is None else v for v in row] for row in m.scores], dtype=float)
    )
    present = values.compressed()
    low, high = (float(present.min()), float(present.max())) if present.size else (0.0, 1.0)
    fig = Figure(figsize=(2.5 + 1.1 * cols, 1.6 + 0.55 * rows))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad=MISSING)
    image = ax.imshow(values, cmap=cmap, vmin=low, vmax=high, aspect="auto")
    for i in range(rows):
        for j in range(cols):
            value = m.scores[i][j]
            if value is None:
                continue
            red, green, blue, _ = cmap(image.norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(
                j, i, f"{value:.1f}", ha="center", va="center", fontsize=9, color="white" if dark else "black"
            )
    ax.set_xticks(range(cols), m.tasks, rotation=30 if cols > 4 else 0)
    ax.set_yticks(range(rows), [_row_label(i, s) for i, s in enumerate(m.stages)])
    ax.set_xlabel("task")
    ax.set_title(f"{m.metric.upper()} after each stage (lower is better)", fontsize=10)
    fig.colorbar(image, ax=ax, label=m.metric.upper())
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def write_heat_map(m: ScoreMatrix, path: str | Path) -> None:
    """Write :func:`heat_map_png` of ``m`` to ``path`` atomically (a temporary sibling, then a rename)."""
    atomic_write_bytes(path, heat_map_png(m))
