"""The controllable demo end to end, at a tiny size (the real defaults take minutes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from difftune.cli import main
from difftune.demos.controlnet import ControlDemoSettings, run_control_demo


def _tiny(tmp_path: Path) -> ControlDemoSettings:
    return ControlDemoSettings(
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        pretrain_steps=4,
        pretrain_batch=8,
        per_class=2,
        bank_samples=6,
        steps=4,
        batch=8,
        validate_every=2,
        validation_samples=4,
        sample_steps=2,
    )


def test_control_demo_measures_every_method(tmp_path: Path) -> None:
    settings = _tiny(tmp_path)
    results = run_control_demo(settings)
    assert list(results) == ["plain", "diff-tuning", "inverse-snr"]
    saved = json.loads((settings.out / "results.json").read_text())
    for name, result in saved.items():
        assert [row["step"] for row in result["curve"]] == [0, 2, 4]
        assert all(0.0 <= row["edge_f1"] <= 1.0 for row in result["curve"])
        assert result["area"] == pytest.approx(results[name]["area"])
        assert result["final"] == pytest.approx(1 - result["curve"][-1]["edge_f1"])
    # every method starts from the same ControlNet (zero convolutions: the source model itself)
    assert len({result["curve"][0]["edge_f1"] for result in saved.values()}) == 1
    # only the Diff-Tuning run reads the bank; the runs are configured as their names say
    for name in saved:
        config = (settings.out / "runs" / name / "config.yaml").read_text()
        assert ("bank_share: 0.0" in config) is (name != "diff-tuning")
    assert (settings.out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "converged at" in (settings.out / "report.md").read_text()


def test_control_demo_dry_run_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "controlnet", "--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "ControlNet" in out and "['plain', 'diff-tuning', 'inverse-snr']" in out
    assert not (tmp_path / "o").exists()


def test_study_summary_has_paired_intervals(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        from controlnet_study import summarise
    finally:
        sys.path.pop(0)

    def run(plain: float, dt: float) -> dict:
        row = {"step": None, "changepoint": 100, "final": 0.5}
        return {"plain": {**row, "area": plain}, "diff-tuning": {**row, "step": 200, "area": dt}}

    text = summarise({0: run(0.6, 0.5), 1: run(0.7, 0.6), 2: run(0.65, 0.57)}, 0.5)
    assert "| plain | 0/3 seeds |" in text and "| diff-tuning | 3/3 seeds, mean 200 |" in text
    # differences -0.1, -0.1, -0.08: mean -0.0933 ± t(2) * 0.0067 = [-0.1220, -0.0646], all better
    line = next(line for line in text.splitlines() if line.startswith("| diff-tuning | area | -0.0933"))
    assert "[-0.1220, -0.0646] | 3/3 | yes |" in line
    noisy = summarise({0: run(0.6, 0.5), 1: run(0.7, 0.65), 2: run(0.65, 0.6)}, 0.5)
    assert "| 3/3 | no |" in noisy  # every seed better, yet the interval [-0.138, +0.005] holds 0
    assert "| diff-tuning | changepoint | +0 | [+0, +0] | 0/3 | no |" in text  # equal change points
