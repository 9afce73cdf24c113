"""Smoke test of benchmarks/peer_dit.py: the tiny model, one repeat of six steps.

The only timing assertion is that the per-step times came out positive.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.fixture
def peer_dit(benchmark_script):
    return benchmark_script("peer_dit")


def test_tiny_run_prints_the_ratio_and_finite_losses(peer_dit, tmp_path: Path, capsys) -> None:
    out = tmp_path / "result.json"
    argv = ["--size", "tiny", "--device", "cpu", "--batch-size", "5", "--images", "8", "--bank-samples", "2"]
    # 6 timed steps: a tiny step (~5-25 ms) stands clear of the noise of two whole train() calls' CPU
    # time (tens of ms on a loaded machine: 2 steps once came out negative in CI)
    argv += ["--repeats", "1", "--steps", "6", "--warmup", "1", "--bank-steps", "2", "--json", str(out)]
    assert peer_dit.main(argv) == 0
    printed = capsys.readouterr().out
    for label in ("device   cpu", "model    tiny", "batch    5 = 4 target + 1 bank", "difftune", "authors"):
        assert label in printed
    last = printed.strip().splitlines()[-1]
    assert last.startswith("ratio ")
    printed_ratio = float(last.split()[1])
    assert math.isfinite(printed_ratio) and printed_ratio > 0

    result = json.loads(out.read_text())
    assert result["ratio"] == pytest.approx(printed_ratio, abs=1e-3)
    assert (result["n_target"], result["n_bank"]) == (4, 1)
    for path in ("difftune", "authors"):
        assert result["paths"][path]["median_ms"] > 0
        losses = result["losses"][path]
        assert losses and all(math.isfinite(x) for x in losses)
    assert set(result["paths"]["authors"]["phases_ms"]) == {"load", "encode", "step"}
    assert len(result["losses"]["authors"]) == 7  # the long run: 1 warm-up step and 6 timed steps
