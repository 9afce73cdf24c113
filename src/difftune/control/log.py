"""The fidelity log of a run: ``fidelity.jsonl``, one JSON object per validation step.

Each line is ``{"step": int, "mse": float, "ssim": float, "dssim": float, "edge_f1": float, ...}``.
Lines are appended one whole line per write and flushed to disk, so a crash can at worst leave the last
line torn; the reader ignores such a line and the next append removes it. A resumed run rewinds the
log to its checkpoint's step first (:func:`difftune.training.run_dir.rewind_logs`); should a step still be logged
twice, the later line supersedes the earlier one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from difftune.errors import UserError

__all__ = ["FIDELITY_FILE", "append_fidelity", "read_fidelity"]

FIDELITY_FILE = "fidelity.jsonl"


def _mend_tail(path: Path) -> None:
    """End the file with a newline, so an append starts a line of its own.

    A last line that lacks its newline is finished if it is a whole JSON object, else (a write cut
    short) cut off.
    """
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
    except ValueError:
        with open(path, "r+b") as f:
            f.truncate(start)
        return
    with open(path, "ab") as f:
        f.write(b"\n")


def append_fidelity(run_dir: str | os.PathLike[str], step: int, scores: Mapping[str, float]) -> Path:
    """Append ``{"step": step, **scores}`` as one line to ``run_dir/fidelity.jsonl``; the file's path.

    The line is written with one ``write`` and flushed with ``fsync``. A torn last line left by a
    crashed writer is removed first (see :func:`read_fidelity`). ``run_dir`` is created if missing.
    """
    path = Path(run_dir) / FIDELITY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        _mend_tail(path)
    record = {"step": int(step), **{name: float(value) for name, value in scores.items()}}
    line = json.dumps(record) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return path


def _parse(line: str, path: Path, number: int, torn_ok: bool) -> dict[str, Any] | None:
    """One log line as a record with an integer ``step``; None if it is not JSON and ``torn_ok``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        if torn_ok:
            return None
        raise UserError(f"{path} line {number} is not JSON ({err.msg}); the log is damaged") from err
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise UserError(f"{path} line {number} is not an object with an integer 'step'")
    return record


def read_fidelity(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``run_dir/fidelity.jsonl``, one per step, in increasing step order.

    A torn last line (one without its newline that is not JSON: an unfinished write) is ignored; for a step logged more than once (a resumed
    run), the last line wins.

    Raises:
        UserError: ``run_dir`` or its log is missing, or a line other than the last is damaged.
    """
    run_dir = Path(run_dir)
    path = run_dir / FIDELITY_FILE
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give a training run's output folder")
    if not path.is_file():
        raise UserError(
            f"{run_dir} has no {FIDELITY_FILE}; was it trained with validation prompts and conditions "
            "(and a validation interval)?"
        )
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    unfinished = not text.endswith("\n")
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse(line, path, number, torn_ok=unfinished and number == len(lines))
        if record is not None:
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]
