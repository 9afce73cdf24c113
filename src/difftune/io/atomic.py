"""Atomic writes: a file (or directory) appears complete under its name, or not at all.

Every writer works on a temporary sibling (``.<name>.<pid>.<random>.tmp``, in the same directory, so
the final rename stays on one file system), which is flushed to disk and then moved onto the target
with ``os.replace``. If the writer raises, the temporary is removed and the target is left as it was.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_directory",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "process_alive",
    "remove_stale_siblings",
]


def _sibling(path: Path, kind: str) -> Path:
    """A fresh hidden name next to ``path`` (unique across processes and threads)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a process of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_siblings(path: str | os.PathLike[str]) -> list[Path]:
    """Delete temporaries of ``path`` left by writers that were killed (their process is gone).

    A writer killed hard (SIGKILL, pre-emption) cannot clean up; for a model directory that can be
    gigabytes. Only siblings named by this module whose process no longer runs are removed, so a
    concurrent writer's temporary is never touched. Returns what was removed.
    """
    path = Path(path)
    removed = []
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*"):
        parts = sibling.name[len(path.name) + 2 :].split(".")  # pid, random, kind
        if len(parts) != 3 or not parts[0].isdigit() or parts[2] not in ("tmp", "old"):
            continue
        if process_alive(int(parts[0])):
            continue
        if sibling.is_dir():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def _fsync(path: Path) -> None:
    """Flush a written file's data to disk (so a crash after the rename cannot leave it empty)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.

    The parent directory is created. The temporary name ends in ``.tmp``, so writers that pick a format
    from the file name (PIL, ``np.savez`` given a name) must be told the format or given a file object.

    Example::

        with atomic_path("model.safetensors") as tmp:
            save_file(tensors, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing (``mode`` ``"w"`` or ``"wb"``); it replaces ``path`` on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(
    path: str | os.PathLike[str], obj: Any, indent: int = 2, sort_keys: bool = False
) -> None:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new temporary directory to fill; on success it takes the place of ``path``.

    An existing ``path`` is moved aside, the new directory renamed into place, then the old one deleted,
    so ``path`` never holds a mix of old and new files. On failure the temporary directory is removed
    and ``path`` is untouched. (Between the two renames ``path`` is briefly absent.)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _sibling(path, "old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
