"""Smoke test of benchmarks/bank_throughput.py: a tiny random DiT, a handful of samples, no scaling runs;
no timing assertions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.fixture
def bank_throughput(benchmark_script):
    """The script as a module; conftest's ``benchmark_script`` restores the settings its main() changes."""
    return benchmark_script("bank_throughput")


def test_tiny_run_prints_the_ratio_and_finite_fids(
    bank_throughput, dit_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "result.json"
    argv = ["--model", str(dit_dir), "--samples", "6", "--batch-size", "4", "--steps-sweep", "2,3"]
    argv += ["--authors-steps", "4", "--classifier-steps", "20", "--bootstrap", "10", "--skip-scaling"]
    assert bank_throughput.main([*argv, "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "ratio 2proc/1proc time nan"
    words = lines[-2].split()
    assert words[:4] == ["ratio", "difftune/authors", "images_per_s", words[3]] and words[4:6] == [
        "at",
        "FID",
    ]
    ratio, fid, authors_fid = float(words[3]), float(words[6]), float(words[8])
    assert math.isfinite(ratio) and ratio > 0 and math.isfinite(fid) and math.isfinite(authors_fid)

    result = json.loads(out.read_text())
    runs = result["runs"]
    # the authors' path, then the sweep with the bank's default step count added
    assert [(r["path"], r["steps"]) for r in runs] == [
        ("authors", 4),
        ("difftune", 2),
        ("difftune", 3),
        ("difftune", 25),
    ]
    for r in runs:
        assert math.isfinite(r["fid"]) and r["fid"] >= 0 and r["images_per_s"] > 0
        assert math.isfinite(r["sigma"]) and r["sigma"] >= 0
    assert set(runs[0]["phases_s"]) == {"sample", "write", "read"}
    assert set(runs[1]["phases_s"]) == {"sample+write", "read"}
    assert result["headline"]["ratio"] == pytest.approx(ratio, abs=5e-3)
    assert result["samples"] == 6 and result["guidance_scale"] == 1.5 and "scaling" not in result


def test_scheduler_options_reach_every_difftune_path(bank_throughput, dit_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    argv = ["--model", str(dit_dir), "--samples", "4", "--batch-size", "4", "--steps-sweep", "2"]
    argv += ["--authors-steps", "3", "--classifier-steps", "10", "--bootstrap", "5", "--skip-scaling"]
    argv += [
        "--scheduler-option",
        "algorithm_type=sde-dpmsolver++",
        "--scheduler-option",
        "thresholding=true",
    ]
    assert bank_throughput.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    options = {"algorithm_type": "sde-dpmsolver++", "thresholding": True}
    assert result["difftune_scheduler_options"] == options
    assert [r["path"] for r in result["runs"]] == ["authors", "difftune +options", "difftune +options"]
