"""``difftune report``: one self-contained HTML page per training run, or one comparing several.

:mod:`~difftune.report.run` reads a run folder (``config.yaml``, ``metrics.jsonl``, ``best/best.json``,
``samples/``), :mod:`~difftune.report.densities` rebuilds the ψ and ξ it trained with,
:mod:`~difftune.report.figures` draws the figures and :mod:`~difftune.report.page` writes the page;
:mod:`~difftune.report.sequence` reads a task sequence folder (its scores and its stages' runs).
Importing this package imports neither torch nor matplotlib.
"""

from __future__ import annotations

from difftune.report.page import render_page, write_report
from difftune.report.run import RunRecord, check_run, load_run, load_runs
from difftune.report.sequence import SequenceRecord, check_path, load_report

__all__ = [
    "RunRecord",
    "SequenceRecord",
    "check_path",
    "check_run",
    "load_report",
    "load_run",
    "load_runs",
    "render_page",
    "write_report",
]
