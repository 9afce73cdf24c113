"""A training run folder as the report reads it: its config, summary, logged rows, best model and grids.

Only light things are imported here (no torch, no matplotlib): a folder that is not a run is refused
before anything heavy loads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune.errors import UserError

HISTORY = "metrics.jsonl"  # as difftune.training.run_dir.HISTORY (that module is not light)
CONFIG = "config.yaml"
SUMMARY = "run_summary.json"
BEST_RECORD = Path("best") / "best.json"
GRID = re.compile(r"step-(\d+)\.png")
# a validation-loss bin of one set: eval/loss/<set>/t<low>-<high>
EVAL_BIN = re.compile(r"eval/loss/(target|bank)/t(\d+)-(\d+)")
SCORES = ("eval/fid", "eval/kid", "eval/forgetting", "eval/forgetting_fid")


@dataclass
class RunRecord:
    """What a run folder holds, read once.

    Attributes:
        path: the run folder.
        name: the name the report shows (the folder's name, longer where two runs share it).
        config: the resolved experiment config (``ExperimentConfig``), or None if it could not be read.
        summary: ``run_summary.json`` (empty if absent).
        train_rows: the training log rows of ``metrics.jsonl`` (those with ``loss/...`` keys).
        eval_rows: its evaluation rows (keys starting with ``eval/``).
        best: ``best/best.json`` or None.
        grids: the sample grids, ``(step, path)`` in step order.
        notes: one line per thing the report could not read or show.
    """

    path: Path
    name: str
    config: Any
    summary: dict[str, Any]
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    grids: list[tuple[int, Path]]
    notes: list[str] = field(default_factory=list)

    def series(self, key: str, rows: list[dict[str, Any]] | None = None) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of ``key`` over the rows that log it (the eval rows for ``eval/`` keys)."""
        if rows is None:
            rows = self.eval_rows if key.startswith("eval/") else self.train_rows
        pairs = [(int(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def eval_bins(self, stream: str) -> list[tuple[int, int]]:
        """The validation-loss bins ``(t_low, t_high)`` of ``stream`` (target, bank), in order of t."""
        found = {
            (int(m.group(2)), int(m.group(3)))
            for row in self.eval_rows
            for key in row
            if (m := EVAL_BIN.fullmatch(key)) and m.group(1) == stream
        }
        return sorted(found)

    @property
    def last_step(self) -> int | None:
        """The last logged step, training or evaluation."""
        steps = [int(r["step"]) for r in self.train_rows + self.eval_rows]
        return max(steps) if steps else None

    @property
    def final_scores(self) -> dict[str, float]:
        """The last evaluation's scores (each key from the last row that has it)."""
        scores: dict[str, float] = {}
        for row in self.eval_rows:
            scores.update({k: v for k, v in row.items() if k.startswith("eval/")})
        return scores


def _read_rows(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The JSON rows of ``metrics.jsonl`` that carry a step; a damaged line is skipped with a note."""
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{bad} line(s) of {HISTORY} could not be read and were skipped")
    return rows


def _read_json(path: Path, notes: list[str]) -> Any:
    """``path``'s JSON, or None (with a note) when it is absent or damaged."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        notes.append(f"{path.name} could not be read ({type(err).__name__})")
        return None


def check_run(path: Path) -> None:
    """Refuse a path that is not a training run folder.

    Raises:
        UserError: the path is missing, is not a folder, or holds no ``metrics.jsonl``.
    """
    if not path.exists():
        raise UserError(f"{path} does not exist; give a run folder written by difftune train")
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; give a run folder written by difftune train")
    if not (path / HISTORY).is_file():
        raise UserError(
            f"{path} is not a difftune run folder: it has no {HISTORY} (written by difftune train)"
        )


def load_run(path: Path, name: str | None = None) -> RunRecord:
    """Read the run folder ``path`` (checked with :func:`check_run`)."""
    from difftune.config.experiment import load_config

    check_run(path)
    notes: list[str] = []
    config = None
    if (path / CONFIG).is_file():
        try:
            config = load_config(path / CONFIG)
        except (UserError, OSError, ValueError) as err:
            notes.append(f"{CONFIG} could not be read: {str(err).splitlines()[0] if str(err) else err!r}")
    else:
        notes.append(f"no {CONFIG}: the model, tuning and schedules are unknown")
    rows = _read_rows(path / HISTORY, notes)
    eval_rows = [r for r in rows if any(k.startswith("eval/") for k in r)]
    train_rows = [r for r in rows if any(k.startswith(("loss/", "loss_by_t/")) for k in r)]
    summary = _read_json(path / SUMMARY, notes)
    best = _read_json(path / BEST_RECORD, notes)
    grids = sorted(
        (int(m.group(1)), p)
        for p in (path / "samples").glob("step-*.png")
        if (m := GRID.fullmatch(p.name)) and p.is_file()
    )
    return RunRecord(
        path=path,
        name=name or path.name,
        config=config,
        summary=summary if isinstance(summary, dict) else {},
        train_rows=train_rows,
        eval_rows=eval_rows,
        best=best if isinstance(best, dict) else None,
        grids=grids,
        notes=notes,
    )


def run_names(paths: list[Path]) -> list[str]:
    """A distinct name per run: the folder's name, with as many parent folders as it takes to differ."""
    parts = [p.absolute().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def load_runs(paths: list[Path], names: list[str] | None = None) -> list[RunRecord]:
    """Check every path first (the first bad one is refused), then read each run.

    Args:
        paths: the run folders.
        names: the name each run is shown under (default: :func:`run_names`).

    Raises:
        UserError: a path is not a run folder, or a run is given twice.
    """
    for path in paths:
        check_run(path)
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.resolve() in seen:
            raise UserError(f"{path} is given twice (as {seen[path.resolve()]}); give each run once")
        seen[path.resolve()] = path
    names = run_names(paths) if names is None else names
    return [load_run(path, name) for path, name in zip(paths, names, strict=True)]


def evenly_spaced(items: list[Any], cap: int) -> list[Any]:
    """At most ``cap`` of ``items``, evenly spaced, always with the first and the last."""
    if cap <= 0:
        return []
    if len(items) <= cap:
        return list(items)
    if cap == 1:
        return [items[-1]]
    picks = sorted({round(i * (len(items) - 1) / (cap - 1)) for i in range(cap)})
    return [items[i] for i in picks]
