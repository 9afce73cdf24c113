"""Smoke test of benchmarks/gpu_throughput.py: the tiny versions of its three models on the CPU, 1 + 2
steps per row; no timing assertions. The auto-batch search and the --batch-size items, without a GPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

MODELS = ("dit-xl2", "sd15-unet", "controlnet")


@pytest.fixture
def gpu_throughput(benchmark_script):
    """The script as a module; conftest's ``benchmark_script`` restores the settings its main() changes."""
    return benchmark_script("gpu_throughput")


def test_tiny_run_prints_rows_mfu_and_ratios(gpu_throughput, tmp_path: Path, capsys) -> None:
    out = tmp_path / "result.json"
    argv = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--peak-tflops", "1"]
    assert gpu_throughput.main([*argv, "--images", "5", "--bank-samples", "8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.strip().splitlines()
    for model in MODELS:
        assert any(line.startswith(f"model    {model}: ") and "GFLOP" in line for line in lines)
        for method in ("plain", "diff-tuning"):
            row = [line.split() for line in lines if line.split()[:2] == [model, method]]
            assert len(row) == 1, (model, method)
            _, _, batch, images_per_s, ms_per_step, _, mfu, mfu_counted, peak, estimate = row[0]
            assert int(batch) == 8 and float(images_per_s) > 0 and float(ms_per_step) > 0
            assert float(mfu.rstrip("%")) > 0 and float(mfu_counted.rstrip("%")) > 0
            assert peak == "-" and float(estimate) >= 0  # no device memory measured on a CPU
    ratios = lines[-len(MODELS) :]
    for line, model in zip(ratios, MODELS, strict=True):
        assert line.startswith("ratio diff-tuning/plain images_per_s ") and line.endswith(f"({model})")
        value = float(line.split()[3])
        assert math.isfinite(value) and value > 0

    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["peak_tflops"] == 1.0
    assert [m["name"] for m in result["models"]] == list(MODELS)
    for m in result["models"]:
        assert m["flops_forward"] > 0 and m["flops_forward_backward"] > m["flops_forward"]
        assert m["batch"] == 8 and m["memory_estimate_bytes"] > 0
    assert len(result["rows"]) == 6 and all(r["images_per_s"] > 0 and r["mfu"] > 0 for r in result["rows"])


def test_auto_batch_doubles_then_backs_off(gpu_throughput) -> None:
    tried: list[int] = []

    def fits_below(limit: int):
        def fits(batch: int) -> bool:
            tried.append(batch)
            return batch <= limit

        return fits

    assert gpu_throughput.search_batch(32, fits_below(100), 8192) == 96
    assert tried == [32, 64, 128, 96]
    tried.clear()
    assert gpu_throughput.search_batch(256, fits_below(100), 8192) == 96  # halves first, then bisects
    assert tried == [256, 128, 64, 96]
    assert gpu_throughput.search_batch(32, fits_below(10**6), 100) == 64  # stops at --max-batch
    assert gpu_throughput.search_batch(8, fits_below(4), 100) == 0  # not even 5 fits


def test_batch_size_items(gpu_throughput) -> None:
    assert gpu_throughput.batch_sizes([], "real") == {"dit-xl2": 128, "sd15-unet": 32, "controlnet": 32}
    assert gpu_throughput.batch_sizes(["16", "dit-xl2=512"], "real") == {
        "dit-xl2": 512,
        "sd15-unet": 16,
        "controlnet": 16,
    }
    with pytest.raises(ValueError, match="unknown model"):
        gpu_throughput.batch_sizes(["unet=8"], "real")
