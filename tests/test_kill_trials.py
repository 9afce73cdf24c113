"""A short run of ``scripts/kill_trials.py``: real SIGKILLs of ``difftune train`` and ``difftune bank``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kill_trials.py"


@pytest.mark.slow
def test_killed_runs_resume_bit_identical(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("kill_trials", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--trials", "3", "--seed", "1"]) == 0
    assert (
        "train 3/3 identical, controlnet 3/3 identical, bank 3/3 identical, latent cache 3/3 identical, "
        "rotation 3/3 identical" in capsys.readouterr().out
    )
