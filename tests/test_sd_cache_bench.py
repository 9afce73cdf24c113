"""Smoke test of benchmarks/sd_cache_bench.py: the tiny pipeline, one repetition; no timing assertions."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def sd_cache_bench():
    """The script as a module; the process-wide settings its main() changes are restored afterwards."""
    sys.path.insert(0, str(BENCHMARKS))
    environ, threads = dict(os.environ), torch.get_num_threads()
    precision = torch.get_float32_matmul_precision()
    try:
        with warnings.catch_warnings():
            import sd_cache_bench

            yield sd_cache_bench
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
        logging.disable(logging.NOTSET)
        sys.path.remove(str(BENCHMARKS))


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
