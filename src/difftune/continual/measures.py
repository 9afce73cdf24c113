"""The scores of a task sequence: the FID of the model after every stage on every task seen so far.

A sequence trains stages 1..T, stage ``i`` on task ``i``; task 0 is the source. Before any stage
(row 0, the source model) and after every stage, the current model is scored on the source and on
every task seen so far. The sequence folder keeps them in ``measures.json``::

    {
      "kind": "continual_measures",
      "metric": "fid",
      "tasks": ["source", "2-3", "4-5"],          # column j: task j (0 = the source)
      "stages": ["source", "2-3", "4-5"],         # row i: the model after stage i (0 = before any)
      "stage_dirs": [null, "stage1-2-3", ...],    # row i's run folder, relative to the sequence folder
      "scores": [[s00, null, null], [s10, s11, null], ...],   # null: not measured
      "before": [null, b1, b2],     # task j's score of the model that starts stage j (label table grown)
      "baseline": [null, c1, c2],   # task j's score of the source model, its label table grown alike
      "summary": {...}              # summarise(): written for readers, recomputed when read
    }

While a sequence runs, ``stages`` (and the rows of ``scores``) may be fewer than ``tasks``. Lower
scores are better. Pure Python: importing this module imports neither torch nor numpy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from difftune.errors import UserError
from difftune.io.atomic import atomic_write_json

KIND = "continual_measures"
MEASURES = "measures.json"
DIGITS = 4  # the summary's values are rounded to this many decimals

Score = float | None


@dataclass
class ScoreMatrix:
    """The scores of a task sequence (see the module's docstring for the layout).

    Attributes:
        tasks: the task names; ``tasks[0]`` is the source.
        stages: the stage names of the rows so far; ``stages[0]`` is the source model (before any stage).
        stage_dirs: each row's run folder relative to the sequence folder (None for row 0).
        scores: ``scores[i][j]``, the score of the model after stage ``i`` on task ``j``, or None.
        before: ``before[j]``, task ``j``'s score of the model that starts stage ``j``, or None.
        baseline: ``baseline[j]``, task ``j``'s score of the source model, or None.
        metric: the score's name (lower is better).
    """

    tasks: list[str]
    stages: list[str]
    stage_dirs: list[str | None]
    scores: list[list[Score]]
    before: list[Score]
    baseline: list[Score]
    metric: str = "fid"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``measures.json``, with its ``kind`` and its ``summary``."""
        return {
            "kind": KIND,
            "metric": self.metric,
            "tasks": list(self.tasks),
            "stages": list(self.stages),
            "stage_dirs": list(self.stage_dirs),
            "scores": [list(row) for row in self.scores],
            "before": list(self.before),
            "baseline": list(self.baseline),
            "summary": summarise(self),
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = MEASURES) -> ScoreMatrix:
        """The matrix of a ``measures.json`` object, checked (its ``summary`` is ignored: it is recomputed).

        Args:
            d: the parsed JSON.
            source: what the messages call the file.

        Raises:
            UserError: the object is not continual measures, or a list has the wrong length or type.
        """
        if not isinstance(d, dict) or d.get("kind") != KIND:
            kind = d.get("kind") if isinstance(d, dict) else type(d).__name__
            _refuse(source, f"its kind is {kind!r}, not {KIND!r}", f'it needs "kind": "{KIND}"')
        metric = d.get("metric", "fid")
        if not isinstance(metric, str):
            _refuse(source, f"metric is {metric!r}, not a name", 'give e.g. "metric": "fid"')
        tasks = _names(d, "tasks", source, optional=False)
        stages = _names(d, "stages", source, optional=False)
        if len(set(tasks)) != len(tasks):
            _refuse(source, f"tasks {tasks} repeat a name", "give each task a distinct name")
        if not 1 <= len(stages) <= len(tasks):
            _refuse(
                source,
                f"it has {len(stages)} stage(s) for {len(tasks)} task(s)",
                "give row 0 (the source model) and at most one stage per task after it",
            )
        stage_dirs = _names(d, "stage_dirs", source, optional=True)
        _length(source, "stage_dirs", stage_dirs, len(stages), "one folder (or null) per stage")
        rows = d.get("scores")
        if not isinstance(rows, list):
            _refuse(source, "scores is not a list of rows", "give one row per stage")
        _length(source, "scores", rows, len(stages), "one row per stage")
        scores = [_scores(row, f"scores[{i}]", len(tasks), source) for i, row in enumerate(rows)]
        before = _scores(d.get("before"), "before", len(tasks), source)
        baseline = _scores(d.get("baseline"), "baseline", len(tasks), source)
        return cls(tasks, stages, stage_dirs, scores, before, baseline, metric)

    def write(self, path: str | Path) -> None:
        """Write :meth:`to_dict` to ``path`` atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> ScoreMatrix:
        """The matrix of the file ``path``.

        Raises:
            UserError: the file is missing, is not JSON, or is not valid continual measures.
        """
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise UserError(
                f"{path} cannot be read ({err.strerror or type(err).__name__}); "
                "give a task sequence folder whose measures.json exists"
            ) from None
        try:
            d = json.loads(text)
        except ValueError as err:
            raise UserError(f"{path} is not valid JSON ({err}); rewrite it or measure again") from None
        return cls.from_dict(d, source=str(path))


def _refuse(source: str, problem: str, fix: str) -> NoReturn:
    """Raise the one-line refusal of a bad ``measures.json``."""
    raise UserError(f"{source} is not valid continual measures: {problem}; fix the file: {fix}")


def _length(source: str, key: str, items: list[Any], want: int, fix: str) -> None:
    if len(items) != want:
        _refuse(source, f"{key} has {len(items)} entries, expected {want}", fix)


def _names(d: dict[str, Any], key: str, source: str, optional: bool) -> list[Any]:
    """``d[key]`` checked to be a list of names (or nulls, where ``optional``)."""
    items = d.get(key)
    ok = isinstance(items, list) and all(isinstance(x, str) or (optional and x is None) for x in items)
    if not ok:
        kind = "names or nulls" if optional else "names"
        _refuse(source, f"{key} is not a list of {kind}", f'give "{key}": [...]')
    return list(items)


def _scores(items: Any, key: str, want: int, source: str) -> list[Score]:
    """``items`` checked to be ``want`` numbers or nulls, as floats."""
    if not isinstance(items, list) or not all(
        x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in items
    ):
        _refuse(
            source, f"{key} is not a list of numbers or nulls", f"give one score or null per task in {key}"
        )
    _length(source, key, items, want, "one score or null per task")
    return [None if x is None else float(x) for x in items]


def _mean(values: list[Score]) -> float | None:
    """The mean of the values that are not None, or None if there are none."""
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


def _difference(a: Score, b: Score) -> float | None:
    return None if a is None or b is None else a - b


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), DIGITS)


def _best_before(m: ScoreMatrix, j: int, last: int) -> float | None:
    """The lowest score on task ``j`` of rows ``j..last-1`` (the rows that measured it before row ``last``)."""
    earlier = [m.scores[i][j] for i in range(j, last) if m.scores[i][j] is not None]
    return min(earlier) if earlier else None


def summarise(m: ScoreMatrix) -> dict[str, Any]:
    """The sequence's summary after its last row ``T = len(stages) - 1`` (the stages done so far).

    With ``s[i][j]`` the score after stage ``i`` on task ``j`` (lower is better), means over the
    values that are not None:

    - ``average``: per row ``i >= 1``, mean of ``s[i][1..i]`` (the tasks learned so far, not the
      source); ``final_average`` is its last value.
    - ``forgetting``: per task ``j`` in ``1..T-1``, ``s[T][j] - min(s[i][j] for j <= i < T)``: how
      much worse the model now is at task ``j`` than at its best (positive = it got worse);
      ``average_forgetting`` is their mean.
    - ``source_forgetting``: ``s[T][0] - min(s[i][0] for 0 <= i < T)``, the same for the source.
    - ``bwt`` (backward transfer, the sign of GEM): mean over ``j`` in ``1..T-1`` of
      ``s[j][j] - s[T][j]``; positive = later stages helped earlier tasks. None if ``T < 2``.
    - ``fwt`` (forward transfer): mean over ``j`` in ``2..T`` of ``baseline[j] - before[j]``;
      positive = the earlier stages help a new task before it is trained.
    - ``source``: ``s[T][0]``.

    Every value is a float rounded to 4 decimals, or None where it is undefined (no stage done, no
    earlier task, or nothing measured).
    """
    last = len(m.stages) - 1
    final = m.scores[last]
    average = [_mean(m.scores[i][1 : i + 1]) for i in range(1, last + 1)]
    forgetting = {m.tasks[j]: _difference(final[j], _best_before(m, j, last)) for j in range(1, last)}
    source_forgetting = _difference(final[0], _best_before(m, 0, last)) if last else None
    bwt = _mean([_difference(m.scores[j][j], final[j]) for j in range(1, last)])
    fwt = _mean([_difference(m.baseline[j], m.before[j]) for j in range(2, last + 1)])
    return {
        "average": [_rounded(a) for a in average],
        "final_average": _rounded(average[-1]) if average else None,
        "forgetting": {task: _rounded(f) for task, f in forgetting.items()},
        "average_forgetting": _rounded(_mean(list(forgetting.values()))),
        "source_forgetting": _rounded(source_forgetting),
        "bwt": _rounded(bwt),
        "fwt": _rounded(fwt),
        "source": _rounded(final[0]),
    }
