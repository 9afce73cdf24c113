"""A task sequence folder as the report reads it: its ``measures.json`` (the scores of the model after
every stage on every task so far) and the run folders of its stages.

A sequence folder holds a ``measures.json`` of kind ``continual_measures`` and no ``config.yaml`` of its
own. Light like :mod:`~difftune.report.run` (no torch, no matplotlib): a path that is neither a run nor
a sequence is refused before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from difftune.continual.measures import MEASURES, ScoreMatrix, summarise
from difftune.errors import UserError
from difftune.report.run import CONFIG, HISTORY, RunRecord, check_run, load_runs, run_names

# what the sign of each measure means, one sentence each (shown under the summary's table)
MEANINGS = (
    ("average", "the mean score over the tasks learned so far, the source left out; lower is better."),
    (
        "forgetting",
        "a task's score now minus its best score since it was learned; positive means the model got "
        "worse at it.",
    ),
    (
        "source forgetting",
        "the source's score now minus its best score at any earlier stage (the source model's "
        "included); positive means the model got worse at the source.",
    ),
    (
        "BWT",
        "backward transfer: the mean over earlier tasks of (score right after learning the task − score "
        "now); positive means later stages helped earlier tasks.",
    ),
    (
        "FWT",
        "forward transfer: the mean over the tasks from the second on of (the source model's score − the score of the model "
        "that starts the task's stage); positive means earlier stages helped a new task before it was "
        "trained.",
    ),
)


@dataclass
class SequenceRecord:
    """What a task sequence folder holds, read once.

    Attributes:
        path: the sequence folder.
        name: the name the report shows.
        matrix: its scores (``measures.json``).
        runs: the report names of its stages' runs, in stage order (those whose folders could be read).
        notes: one line per stage whose run folder is not shown.
    """

    path: Path
    name: str
    matrix: ScoreMatrix
    runs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_path(path: Path) -> ScoreMatrix | None:
    """Refuse a path that is neither a run folder nor a task sequence folder.

    Returns:
        The sequence's scores, or None for a run folder.

    Raises:
        UserError: the path is not a run folder (see :func:`~difftune.report.run.check_run`) and holds
            no valid ``measures.json``.
    """
    if not (path.is_dir() and (path / MEASURES).is_file() and not (path / CONFIG).is_file()):
        check_run(path)
        return None
    try:
        return ScoreMatrix.read(path / MEASURES)
    except UserError as bad:
        try:
            check_run(path)
        except UserError as not_run:
            raise UserError(f"{not_run}; nor is it a task sequence folder: {bad}") from None
        return None


def _stage_runs(path: Path, name: str, matrix: ScoreMatrix) -> tuple[list[Path], SequenceRecord]:
    """The run folders of a sequence's stages that hold a log, and its record (naming them)."""
    record = SequenceRecord(path, name, matrix)
    folders = []
    for i, folder in enumerate(matrix.stage_dirs[1:], start=1):
        stage = f"stage {i} ({matrix.stages[i]})"
        if folder is None:
            record.notes.append(f"{stage}: no run folder recorded")
        elif not (path / folder / HISTORY).is_file():
            record.notes.append(f"{stage}: {folder} holds no {HISTORY} (yet); its run is not shown")
        else:
            folders.append(path / folder)
            record.runs.append(f"{name}/{folder}")
    return folders, record


def load_report(paths: list[Path]) -> tuple[list[RunRecord], list[SequenceRecord]]:
    """Check every path first (the first bad one is refused), then read the runs and the sequences.

    A sequence's stage runs join the runs where the sequence was given, named
    ``<sequence>/<stage folder>``.

    Raises:
        UserError: a path is neither a run nor a sequence folder, or a run is given twice.
    """
    matrices = [check_path(path) for path in paths]
    folders: list[Path] = []
    names: list[str] = []
    sequences = []
    for path, name, matrix in zip(paths, run_names(paths), matrices, strict=True):
        if matrix is None:
            folders.append(path)
            names.append(name)
            continue
        stages, record = _stage_runs(path, name, matrix)
        folders += stages
        names += record.runs
        sequences.append(record)
    return load_runs(folders, names), sequences


def summary_rows(matrix: ScoreMatrix) -> list[tuple[str, float | None]]:
    """The summary's measures (:func:`~difftune.continual.measures.summarise`) as ``(label, value)`` rows."""
    summary = summarise(matrix)
    metric = matrix.metric.upper()
    rows = [
        (f"average {metric} after {stage}", value)
        for stage, value in zip(matrix.stages[1:], summary["average"], strict=True)
    ]
    rows += [(f"forgetting of {task}", value) for task, value in summary["forgetting"].items()]
    rows += [
        ("average forgetting", summary["average_forgetting"]),
        ("source forgetting", summary["source_forgetting"]),
        (f"{metric} on the source, now", summary["source"]),
        ("BWT (backward transfer)", summary["bwt"]),
        ("FWT (forward transfer)", summary["fwt"]),
    ]
    return rows
