"""Smoke test of benchmarks/sd_cache_bench.py: the tiny pipeline, one repetition; no timing assertions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.fixture
def sd_cache_bench(benchmark_script):
    """The script as a module; conftest's ``benchmark_script`` restores the settings its main() changes."""
    return benchmark_script("sd_cache_bench")


def test_tiny_run_prints_and_writes_its_fields(sd_cache_bench, tmp_path: Path, capsys) -> None:
    out = tmp_path / "result.json"
    argv = ["--size", "tiny", "--repeats", "1", "--batch-size", "2", "--steps", "1", "--warmup", "1"]
    assert sd_cache_bench.main([*argv, "--images", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("device   cpu", "torch ", "diffusers ", "transformers ", "model    tiny", "objective"):
        assert label in printed
    assert "cached" in printed and "uncached" in printed and "encoding (load + vae + text)" in printed
    last = printed.strip().splitlines()[-1]
    assert last.startswith("ratio ")
    printed_ratio = float(last.split()[1])
    assert math.isfinite(printed_ratio) and printed_ratio > 0

    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["size"] == "tiny" and result["batch_size"] == 2
    assert set(result["versions"]) >= {"torch", "diffusers", "transformers"}
    assert result["model"]["latent_shape"] == [4, 4, 4]
    for mode in ("cached", "uncached"):
        m = result["modes"][mode]
        assert len(m["per_repeat_ms"]) == 1 and m["median_ms"] > 0
        assert "step" in m["phases_ms"] and "data" in m["phases_ms"]
    assert set(result["modes"]["uncached"]["phases_ms"]) >= {"load", "vae", "text"}
    assert "vae" not in result["modes"]["cached"]["phases_ms"]
    ratio = result["ratio"]
    assert math.isfinite(ratio) and ratio > 0
    assert ratio == pytest.approx(printed_ratio, abs=1e-3)
    assert 0 < result["encoding_share"] < 1
