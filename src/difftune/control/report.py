"""Convergence reports over runs' fidelity logs: the curves, a table of their summaries and a plot.

Used by ``difftune convergence`` and the controllable demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difftune.control.convergence import summarise
from difftune.errors import UserError


def curve_label(metric: str) -> str:
    """The name of the dissimilarity curve analysed for ``metric``."""
    return "1-edge_f1" if metric == "edge_f1" else metric


def fidelity_curve(run: str, records: list[dict[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    """The steps and the dissimilarity values of ``metric`` in a run's records."""
    if not records:
        raise UserError(
            f"{run}: fidelity.jsonl holds no complete line yet; rerun once a validation step ends"
        )
    for record in records:
        if metric not in record:
            found = ", ".join(k for k in record if k != "step")
            raise UserError(
                f"{run}: step {record['step']} has no {metric!r} (it has: {found}); pick --metric"
            )
    values = [float(r[metric]) for r in records]
    if metric == "edge_f1":
        values = [1.0 - v for v in values]
    return [int(r["step"]) for r in records], values


def default_metric(all_records: dict[str, list[dict[str, Any]]]) -> str:
    """``edge_f1`` if every line of every run has it, else ``mse``."""
    everywhere = all("edge_f1" in r for records in all_records.values() for r in records)
    return "edge_f1" if everywhere else "mse"


def format_table(rows: list[dict[str, Any]], metric: str, threshold: float) -> str:
    """The summaries as an aligned text table, under a line saying what is measured."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    header = ["run", "metric", "converged at", "change point", "area", "final"]
    keys = ["run", "metric", "step", "changepoint", "area", "final"]
    table = [header] + [[cell(row[k]) for k in keys] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [
        f"{curve_label(metric)} (lower is better); converged at = first step from which it stays <= {threshold:g}"
    ]
    for line in table:
        lines.append("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip())
    return "\n".join(lines)


def plot_fidelity(
    curves: dict[str, tuple[list[int], list[float]]], rows: list[dict[str, Any]], path: Path
) -> None:
    """Every run's curve on one axes, the threshold and each run's convergence step; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difftune.io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in rows:
        steps, values = curves[row["run"]]
        (line,) = ax.plot(steps, values, marker="o", markersize=3, label=row["run"])
        if row["step"] is not None:
            ax.axvline(row["step"], color=line.get_color(), linestyle=":", alpha=0.7)
    ax.axhline(
        rows[0]["threshold"], color="grey", linestyle="--", label=f"threshold {rows[0]['threshold']:g}"
    )
    ax.set(xlabel="training step", ylabel=f"{curve_label(rows[0]['metric'])} (lower is better)")
    ax.set_title("Condition fidelity; dotted: sudden-convergence step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def summary_rows(
    curves: dict[str, tuple[list[int], list[float]]], metric: str, threshold: float
) -> list[dict[str, Any]]:
    """One row per run: its name, the metric, the threshold and the curve's summary."""
    rows = []
    for run, (steps, values) in curves.items():
        try:
            summary = summarise(steps, values, threshold)
        except UserError as err:
            raise UserError(f"{run}: {err}") from err
        rows.append({"run": run, "metric": curve_label(metric), "threshold": threshold, **summary.to_dict()})
    return rows
