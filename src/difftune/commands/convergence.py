"""``difftune convergence``: when did ControlNet runs converge to their control conditions?

    difftune convergence runs/canny-a runs/canny-b                  # a table, one row per run
    difftune convergence runs/canny-* --metric mse --threshold 0.03 --plot fidelity.png

Each run folder holds ``fidelity.jsonl``, written during training at every validation step. The curve
analysed is a dissimilarity (lower is better): ``1 - edge_f1``, ``mse`` or ``dssim``. For each run the
table gives the sudden-convergence step (the first step from which the curve stays at or below the
threshold), the change-point step (the best two-level split of the curve, threshold-free), the area
(the curve's mean level over the steps) and the final value.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from difftune.errors import UserError

# a run's convergence threshold on each metric's dissimilarity curve when --threshold is not given
DEFAULT_THRESHOLDS = {"edge_f1": 0.5, "mse": 0.05, "dssim": 0.25}


def curve_label(metric: str) -> str:
    """The name of the dissimilarity curve analysed for ``metric``."""
    return "1-edge_f1" if metric == "edge_f1" else metric


def _curve(run: str, records: list[dict[str, Any]], metric: str) -> tuple[list[int], list[float]]:
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


def _default_metric(all_records: dict[str, list[dict[str, Any]]]) -> str:
    """``edge_f1`` if every line of every run has it, else ``mse``."""
    everywhere = all("edge_f1" in r for records in all_records.values() for r in records)
    return "edge_f1" if everywhere else "mse"


def _print_table(rows: list[dict[str, Any]], metric: str, threshold: float) -> None:
    """The summaries as an aligned text table."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    header = ["run", "metric", "converged at", "change point", "area", "final"]
    keys = ["run", "metric", "step", "changepoint", "area", "final"]
    table = [header] + [[cell(row[k]) for k in keys] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    print(
        f"{curve_label(metric)} (lower is better); converged at = first step from which it stays <= {threshold:g}"
    )
    for line in table:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip())


def _plot(curves: dict[str, tuple[list[int], list[float]]], rows: list[dict[str, Any]], path: Path) -> None:
    """Every run's curve on one axes, the threshold and each run's convergence step; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difftune.atomic import atomic_path

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


def cmd_convergence(args: argparse.Namespace) -> int:
    from difftune.control.convergence import summarise
    from difftune.control.log import read_fidelity

    if args.plot is not None and Path(args.plot).is_dir():
        raise UserError(f"--plot {args.plot} is a directory; give a .png file name")
    all_records = {run: read_fidelity(run) for run in args.runs}
    metric = args.metric or _default_metric(all_records)
    threshold = DEFAULT_THRESHOLDS[metric] if args.threshold is None else args.threshold
    curves = {run: _curve(run, records, metric) for run, records in all_records.items()}
    if args.dry_run:
        where = f", plotted to {args.plot}" if args.plot else ""
        print(
            f"would summarise {len(curves)} run(s) on {curve_label(metric)} at threshold {threshold:g}{where}"
        )
        return 0
    rows = []
    for run, (steps, values) in curves.items():
        try:
            summary = summarise(steps, values, threshold)
        except UserError as err:
            raise UserError(f"{run}: {err}") from err
        rows.append({"run": run, "metric": curve_label(metric), "threshold": threshold, **summary.to_dict()})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, metric, threshold)
    if args.plot:
        _plot(curves, rows, Path(args.plot))
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``difftune convergence``."""
    p = subparsers.add_parser(
        "convergence",
        help="when runs converged to their control conditions (ControlNet's fidelity.jsonl)",
        description="Summarise each run's condition-fidelity curve (lower is better): the sudden-"
        "convergence step, the change-point step, the area (mean level) and the final value.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run folders holding fidelity.jsonl")
    p.add_argument(
        "--metric",
        choices=sorted(DEFAULT_THRESHOLDS),
        help="the fidelity score to analyse; edge_f1 is analysed as 1 - edge_f1 "
        "(default: edge_f1 if every run logs it, else mse)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="converged once the curve stays at or below this (default: 0.5 for 1 - edge_f1, "
        "0.05 for mse, 0.25 for dssim)",
    )
    p.add_argument("--plot", metavar="OUT.png", help="also write every run's curve to this PNG")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON instead of a table")
    p.add_argument("--dry-run", action="store_true", help="validate the runs and print the plan, do nothing")
    p.set_defaults(func=cmd_convergence)
