"""``benchmarks/real_size.py`` on its Stable Diffusion path at tiny size (``sd15-tiny``,
``sd15-controlnet-tiny``: the same pipeline, recipes and phases as ``sd15`` / ``sd15-controlnet``):
every phase runs in its own process and succeeds, and the stock pipeline loads the final model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_size.py"
PHASES = ["bank", "train 2 steps", "resume to step 3", "sample"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "stock", "pipeline"),
    [
        ("sd15-tiny", "stock SD pipeline", "StableDiffusionPipeline"),
        ("sd15-controlnet-tiny", "stock SD+ControlNet pipe", "StableDiffusionControlNetPipeline"),
    ],
)
def test_sd_path_end_to_end(tmp_path: Path, size: str, stock: str, pipeline: str) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", size, "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["size"] == size
    assert [row["phase"] for row in report["phases"]] == [*PHASES, stock]
    assert all(row["seconds"] > 0 and row["peak"] > 0 for row in report["phases"])
    assert report["estimate"].startswith("memory     about ")
    assert report["phases"][-1]["stdout"] == f"{pipeline} (32, 32)"
    assert any(line.startswith("ratio estimated/measured train peak ") for line in lines)
    final = tmp_path / "run" / "final"
    assert (final / "model_index.json").is_file()
    assert (final / ("controlnet" if "controlnet" in size else "unet")).is_dir()
    assert len(list((tmp_path / "samples").glob("*.png"))) >= 1
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["resume_from"]["step"] == 2 and summary["max_steps"] == 3
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().strip().splitlines()
    assert json.loads(metrics[-1])["step"] == 3
