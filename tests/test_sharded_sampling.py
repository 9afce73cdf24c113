"""Smoke test of benchmarks/sharded_sampling.py: a tiny DiT on 2 FSDP2 CPU processes, one repeat.

It checks that both ways of making the grid ran and that the ratio is printed and written; no timing
assertion beyond both times being positive.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def test_tiny_run_times_both_grids_and_prints_the_ratio(benchmark_script, tmp_path: Path, capsys) -> None:
    script = benchmark_script("sharded_sampling")
    out = tmp_path / "result.json"
    argv = ["--hidden", "64", "--layers", "2", "--steps", "2", "--repeats", "1", "--per-class", "2"]
    assert script.main([*argv, "--json", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("ratio shared/duplicated grid_time ")
    result = json.loads(out.read_text())
    assert {name: len(values) for name, values in result["times_s"].items()} == {"shared": 1, "duplicated": 1}
    assert all(value > 0 for values in result["times_s"].values() for value in values)
    assert math.isfinite(result["ratio"]) and abs(result["ratio"] - float(last.split()[-1])) < 1e-3
