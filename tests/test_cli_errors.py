"""How ``difftune`` reports errors: bad input as one line (a traceback with -v), bugs as tracebacks."""

from __future__ import annotations

from pathlib import Path

import pytest

import difftune.demos.settings
from difftune.cli import USER_ERRORS, main
from difftune.config.experiment import ConfigError
from difftune.errors import UserError


def test_config_error_is_a_user_error_and_a_value_error() -> None:
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    assert all(issubclass(t, USER_ERRORS) for t in (UserError, ConfigError, FileNotFoundError))
    assert not issubclass(ValueError, USER_ERRORS)  # a ValueError from a bug is not bad input


def test_value_error_from_a_bug_shows_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("math domain error, deep inside")

    monkeypatch.setattr(difftune.demos.settings, "DemoSettings", broken)
    with pytest.raises(ValueError, match="math domain error"):
        main(["demo", "--dry-run", "--out", str(tmp_path / "demo")])


def test_user_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", "--dry-run", "--model", str(tmp_path / "no-model")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difftune: error:") and "no-model" in lines[0]


def test_verbose_user_error_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v", "sample", "--dry-run", "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "FileNotFoundError" in err and "no-model" in err


def test_bug_is_not_reported_as_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(difftune.demos.settings, "DemoSettings", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["demo", "--dry-run", "--out", str(tmp_path / "demo")])
    assert "difftune: error" not in capsys.readouterr().err


def test_a_full_disk_is_one_line_whatever_library_reports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors import SafetensorError

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(difftune.demos.settings, "DemoSettings", full)
    assert main(["demo", "--dry-run", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device (SafetensorError); free space" in err
    with pytest.raises(SafetensorError):  # -v shows where
        main(["-v", "demo", "--dry-run", "--out", str(tmp_path / "demo")])


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["sample", "--dry-run", "--model", "{model}", "--batch-size", "0"],
            "--batch-size must be >= 1, got 0",
        ),
        (
            ["eval", "fid", "--dry-run", "--real", "{bad_npz}", "--fake", "{tmp}"],
            "not a readable statistics .npz",
        ),
        (
            [
                "forgetting",
                "--dry-run",
                "--finetuned",
                "a",
                "--pretrained",
                "b",
                "--heldout",
                "{tmp}",
                "--gap-bins",
                "0",
            ],
            "--gap-bins must be >= 1, got 0",
        ),
    ],
)
def test_bad_numbers_and_files_are_one_line(
    argv: list[str], message: str, dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_npz = tmp_path / "stats.npz"
    bad_npz.write_bytes(b"not a zip file")
    filled = [a.format(model=dit_dir, bad_npz=bad_npz, tmp=tmp_path) for a in argv]
    assert main(filled) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
