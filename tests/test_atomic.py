"""difftune.io.atomic: a target is either complete or untouched, and no temporary file is left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from difftune.io.atomic import (
    atomic_directory,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


class Boom(Exception):
    pass


def test_writes_are_complete_and_leave_nothing_else(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01" * 1000)
    atomic_write_text(tmp_path / "sub" / "b.txt", "héllo\n")  # creates the parent
    atomic_write_json(tmp_path / "c.json", {"z": 1, "a": [1, 2]})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01" * 1000
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "c.json").read_text()) == {"z": 1, "a": [1, 2]}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "b.txt", "c.json", "sub"]


def test_overwrite_replaces_the_content(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    atomic_write_text(target, "a long first version\n")
    atomic_write_text(target, "short\n")
    assert target.read_text() == "short\n"


def test_failed_writer_leaves_the_target_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("half-writ")
        raise Boom
    with pytest.raises(Boom), atomic_open(target, "w") as f:
        f.write("half")
        raise Boom
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_failed_writer_creates_no_target(tmp_path: Path) -> None:
    with pytest.raises(Boom), atomic_path(tmp_path / "new.bin") as tmp:
        tmp.write_bytes(b"x")
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_open_refuses_modes_that_do_not_write_a_new_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"), atomic_open(tmp_path / "x", "a"):
        pass


def test_atomic_directory_swaps_in_a_complete_directory(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    with atomic_directory(target) as tmp:
        assert not (tmp / "stale.bin").exists()
        (tmp / "weights.bin").write_bytes(b"new")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "config.json").write_text("{}")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "nested",
        "nested/config.json",
        "weights.bin",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_failed_atomic_directory_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old")
    with pytest.raises(Boom), atomic_directory(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"partial")
        raise Boom
    assert (target / "weights.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_directory_writer_removes_temporaries_of_killed_writers_only(tmp_path: Path) -> None:
    import subprocess
    import sys

    from difftune.io.atomic import atomic_directory

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)  # that process has exited
    stale_tmp = tmp_path / f".final.{dead_pid}.abcd1234.tmp"
    stale_old = tmp_path / f".final.{dead_pid}.abcd1234.old"
    live = tmp_path / f".final.{os.getpid()}.abcd1234.tmp"  # a writer still running: left alone
    unrelated = tmp_path / ".final.notes.txt"
    for d in (stale_tmp, stale_old, live):
        (d / "model").mkdir(parents=True)
    unrelated.write_text("keep")
    with atomic_directory(tmp_path / "final") as staging:
        (staging / "weights.bin").write_bytes(b"new")
    assert not stale_tmp.exists() and not stale_old.exists()
    assert live.exists() and unrelated.read_text() == "keep"
    assert (tmp_path / "final" / "weights.bin").read_bytes() == b"new"
