"""The bad-input corpus of ``scripts/bad_input_corpus.py``: every bad input is refused in one line that
names the problem and its fix, with no traceback and nothing left behind; odd but valid images train."""

from __future__ import annotations

import errno
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bad_input_corpus.py"


def _load_corpus() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bad_input_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    return module


corpus = _load_corpus()

# cases that meet a known bug: each must fail (strict), until src/ is fixed
KNOWN_BUGS: dict[str, str] = {}  # case name -> the bug, for a case that fails until it is fixed


def _params(cases: list[corpus.Case]) -> list[object]:
    """``cases`` as pytest parameters named after them, the known bugs marked as strict xfails."""
    return [
        pytest.param(
            case,
            id=case.name,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[case.name])]
            if case.name in KNOWN_BUGS
            else [],
        )
        for case in cases
    ]


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> corpus.Assets:
    """The tiny models, bank and earlier run every case shares (built on first use)."""
    return corpus.Assets(tmp_path_factory.mktemp("corpus-assets"))


def _workspace(tmp_path: Path, assets: corpus.Assets) -> corpus.Workspace:
    return corpus.Workspace(tmp_path / "workspace", assets)


def _shown(result: corpus.CaseResult) -> str:
    return f"\n--- stderr ---\n{result.stderr[-4000:]}"


def test_the_corpus_covers_every_kind_of_bad_input() -> None:
    names = [case.name for case in corpus.CASES]
    assert len(names) >= 28 and len(set(names)) == len(names)
    assert {case.category for case in corpus.CASES} == {
        "images",
        "folders",
        "configs",
        "models and banks",
        "outputs and runs",
    }
    assert set(KNOWN_BUGS) <= {*names, corpus.UNWRITABLE_AS_ROOT}  # no typo in a bug's case name


@pytest.mark.parametrize("case", _params(corpus.CASES))
def test_bad_input_is_one_line_and_leaves_nothing_behind(
    case: corpus.Case, assets: corpus.Assets, tmp_path: Path
) -> None:
    result = corpus.run_case(case, _workspace(tmp_path, assets))
    assert result.exit_code == case.exit_code, f"exit code {result.exit_code}{_shown(result)}"
    assert "Traceback" not in result.stderr, _shown(result)
    assert len(result.error_lines) == 1, f"{len(result.error_lines)} error lines{_shown(result)}"
    line = result.error_lines[0]
    assert re.search(case.problem, line), f"the line does not name the problem /{case.problem}/:\n{line}"
    assert re.search(case.fix, line), f"the line does not say how to fix it /{case.fix}/:\n{line}"
    assert result.changed == [], f"changed or removed: {result.changed}"
    assert result.left_behind == [], f"left behind: {result.left_behind}"
    assert result.passed, result.failures  # the script's own verdict agrees


@pytest.mark.parametrize("case", _params(corpus.HANDLED_CASES))
def test_odd_but_valid_images_train(case: corpus.Case, assets: corpus.Assets, tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, assets)
    result = corpus.run_case(case, workspace)
    assert result.exit_code == 0, f"exit code {result.exit_code}{_shown(result)}"
    assert result.error_lines == [] and "Traceback" not in result.stderr, _shown(result)
    assert (workspace.run / "final" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert result.changed == [], f"the inputs changed: {result.changed}"
    assert result.passed, result.failures


def _full_disk_at_the_second_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    import difftune.training.checkpoint_files

    original, calls = difftune.training.checkpoint_files.save_model, []

    def full_disk(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(*args, **kwargs)

    monkeypatch.setattr(difftune.training.checkpoint_files, "save_model", full_disk)


DISK_FULL = corpus.Case(
    "disk full during a checkpoint",
    "outputs and runs",
    lambda ws: ws.train("train.max_steps=3", dry_run=False),
    problem=r"could not write checkpoint-0000002 \(No space left on device\)",
    fix=r"the last complete checkpoint is .*checkpoint-0000001; free space or fix the folder, then resume with "
    r"train\.resume=latest",
    # what the run wrote up to the failure, all of it complete: the target cache, the run's config,
    # summary, metrics and TensorBoard log, and the checkpoint of step 1; not checkpoint-0000002(.tmp),
    # final/ or the lock
    allowed_new=(
        *corpus.TARGET_CACHE,
        "run/config.yaml",
        "run/run_summary.json",
        "run/metrics.jsonl",
        "run/difftune",
        "run/difftune/*",
        "run/checkpoints",
        "run/checkpoints/checkpoint-0000001",
        "run/checkpoints/checkpoint-0000001/*",
    ),
)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_loses_nothing(
    assets: corpus.Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from difftune.training.state import checkpoint_problem

    workspace = _workspace(tmp_path, assets)
    _full_disk_at_the_second_checkpoint(monkeypatch)
    result = corpus.run_case(DISK_FULL, workspace)
    assert result.exit_code == 2, f"exit code {result.exit_code}{_shown(result)}"
    assert "Traceback" not in result.stderr and len(result.error_lines) == 1, _shown(result)
    line = result.error_lines[0]
    assert re.search(DISK_FULL.problem, line) and re.search(DISK_FULL.fix, line), line
    assert result.changed == [] and result.left_behind == [], result.failures
    checkpoints = workspace.run / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-0000001"]  # no staging folder
    assert checkpoint_problem(checkpoints / "checkpoint-0000001") is None  # complete: resumable
    assert result.passed, result.failures
