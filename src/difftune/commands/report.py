"""``difftune report``: an HTML page of a training run, or one comparing several runs.

    difftune report runs/x                                  # writes runs/x/report.html
    difftune report runs/plain runs/difftune --out compare.html
    difftune report runs/sequence                           # a task sequence: its stages' runs too

The page needs no other file: every figure (training loss per quarter of t, validation loss per bin
of t, ψ and ξ, FID/KID/forgetting over steps, FID against forgetting) and every sample grid is
embedded as a PNG. One run's page goes to ``<run>/report.html``; several runs' to ``report.html`` in
the current folder unless ``--out`` says otherwise. A task sequence folder (its ``measures.json``)
adds its stages' runs and a section with the heat map of its scores after each stage and its summary
(average score, forgetting, backward and forward transfer).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from difftune.errors import UserError
from difftune.report.page import DEFAULT_MAX_GRIDS

DEFAULT_NAME = "report.html"


def output_path(runs: list[Path], out: str | None) -> Path:
    """Where the page goes: ``--out``, else ``<run>/report.html`` for one run and ``./report.html`` for
    several.

    Raises:
        UserError: ``--out`` names a folder.
    """
    if out is not None:
        if Path(out).is_dir():
            raise UserError(f"--out {out} is a folder; give an .html file name")
        return Path(out)
    return runs[0] / DEFAULT_NAME if len(runs) == 1 else Path(DEFAULT_NAME)


def cmd_report(args: argparse.Namespace) -> int:
    """Check the run and sequence folders, then write the report page."""
    from difftune.report.sequence import check_path

    if args.max_grids < 0:
        raise UserError(f"--max-grids must be >= 0, got {args.max_grids}")
    runs = [Path(run) for run in args.runs]
    for run in runs:
        check_path(run)
    out = output_path(runs, args.out)
    if args.dry_run:
        print(f"would write the report of {len(runs)} run or sequence folder(s) to {out}")
        return 0
    from difftune.report.page import write_report

    write_report(runs, out, args.max_grids)
    print(f"wrote {out}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``difftune report``."""
    p = subparsers.add_parser(
        "report",
        help="an HTML page of a training run's curves, ψ/ξ, scores and sample grids (or several runs')",
        description="Write one self-contained HTML page for a run folder, or one comparison page for "
        "several: training loss per quarter of t, validation loss per bin of t, the ψ/ξ densities, "
        "FID/KID/forgetting over steps, FID against forgetting, sample grids and a summary table.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folders written by difftune train, or task sequence folders (with measures.json)",
    )
    p.add_argument(
        "--out",
        metavar="PAGE.html",
        help="where to write the page (default: RUN/report.html for one run, ./report.html for several)",
    )
    p.add_argument(
        "--max-grids",
        type=int,
        default=DEFAULT_MAX_GRIDS,
        help="at most this many sample grids per run, evenly spaced over the steps (default %(default)s)",
    )
    p.add_argument("--dry-run", action="store_true", help="check the run folders, print the plan, do nothing")
    p.set_defaults(func=cmd_report)
