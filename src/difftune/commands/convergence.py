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


def cmd_convergence(args: argparse.Namespace) -> int:
    from difftune.control.log import read_fidelity
    from difftune.control.report import (
        curve_label,
        default_metric,
        fidelity_curve,
        format_table,
        plot_fidelity,
        summary_rows,
    )

    if args.plot is not None and Path(args.plot).is_dir():
        raise UserError(f"--plot {args.plot} is a directory; give a .png file name")
    all_records = {run: read_fidelity(run) for run in args.runs}
    metric = args.metric or default_metric(all_records)
    threshold = DEFAULT_THRESHOLDS[metric] if args.threshold is None else args.threshold
    curves = {run: fidelity_curve(run, records, metric) for run, records in all_records.items()}
    if args.dry_run:
        where = f", plotted to {args.plot}" if args.plot else ""
        print(
            f"would summarise {len(curves)} run(s) on {curve_label(metric)} at threshold {threshold:g}{where}"
        )
        return 0
    rows = summary_rows(curves, metric, threshold)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, metric, threshold))
    if args.plot:
        plot_fidelity(curves, rows, Path(args.plot))
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
