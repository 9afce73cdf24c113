"""Smoke test of benchmarks/peer_sd.py: the tiny pipeline, one repeat, both modes.

The only timing assertion is that the per-step times came out positive.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.fixture
def peer_sd(benchmark_script):
    return benchmark_script("peer_sd")


@pytest.mark.parametrize("mode", ["text_to_image", "controlnet"])
def test_tiny_run_prints_the_ratio_and_both_loops_train(peer_sd, mode: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "result.json"
    argv = ["--mode", mode, "--size", "tiny", "--device", "cpu", "--batch-size", "5", "--images", "10"]
    # 6 timed steps: a tiny step (~25 ms) stands clear of the noise of two whole train() calls' CPU
    # time (tens of ms on a loaded machine: 2 steps once came out negative in CI)
    argv += ["--bank-samples", "2", "--bank-steps", "2", "--repeats", "1", "--steps", "6", "--warmup", "1"]
    assert peer_sd.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    script = "train_controlnet.py" if mode == "controlnet" else "train_text_to_image.py"
    for label in (
        script,
        "device   cpu",
        "model    tiny",
        "batch    5: peer 5 target images; difftune 4 target + 1 bank",
    ):
        assert label in printed
    assert ("ControlNet.from_unet" in printed) == (mode == "controlnet")
    last = printed.strip().splitlines()[-1]
    assert last.startswith("ratio ")
    printed_ratio = float(last.split()[1])
    assert math.isfinite(printed_ratio) and printed_ratio > 0

    result = json.loads(out.read_text())
    assert result["mode"] == mode
    assert result["ratio"] == pytest.approx(printed_ratio, abs=1e-3)
    assert set(result["paths"]["peer"]["phases_ms"]) == {"load", "encode", "step"}
    for path in ("difftune", "peer"):
        assert result["paths"][path]["median_ms"] > 0
        losses = result["losses"][path]
        assert losses and all(math.isfinite(x) for x in losses)
        # every timed run (short and long) of both paths changed the weights it trains
        changes = result["weight_changes"][path]
        assert len(changes) >= 2 and all(change > 0 for change in changes)
    # the peer logs every step's loss (its per-step host sync): the long run's 1 warm-up + 6 timed steps
    assert len(result["losses"]["peer"]) == 7
    assert len(result["losses"]["difftune"]) == 1  # one log per difftune run: at its end
