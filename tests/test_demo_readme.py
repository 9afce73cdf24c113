"""The demo end to end (tiny settings) and the README/CI contract."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from difftune.demos.digits import DemoSettings, run_demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_writes_results_for_both_methods(tiny_demo: DemoSettings) -> None:
    settings = tiny_demo
    results = run_demo(settings)
    on_disk = json.loads((settings.out / "results.json").read_text())
    assert set(on_disk) == {"pre-trained (no tuning)", "plain", "diff-tuning"}
    for name in ("plain", "diff-tuning"):
        assert on_disk[name]["fid"] == pytest.approx(results[name]["fid"])
        assert on_disk[name]["fid"] >= 0
        assert [p["step"] for p in on_disk[name]["fid_curve"]] == [2, 4]
        assert (settings.out / f"samples_{name}.png").is_file()
    assert (settings.out / "curves.png").is_file()
    env = json.loads((settings.out / "run_info.json").read_text())["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert {"python", "cpu", "diffusers", "accelerate", "numpy", "scikit-learn"} <= set(env)
    report = (settings.out / "report.md").read_text()
    assert "| plain |" in report and "| diff-tuning |" in report
    assert "not significant" in report and "docs/reproduction.md" in report  # the study's verdict, linked
    # the two methods start from the same cached source model and differ in their objective only
    plain = (settings.out / "runs" / "plain" / "config.yaml").read_text()
    difft = (settings.out / "runs" / "diff-tuning" / "config.yaml").read_text()
    assert "bank_share: 0.0" in plain and "bank_share: 0.2" in difft


def test_demo_scores_domain_guidance_when_asked(tiny_demo: DemoSettings) -> None:
    settings = tiny_demo
    settings.domain_guidance = True
    settings.methods = {"plain": {"target_schedule": "uniform", "bank_share": 0.0}}
    results = run_demo(settings)
    guided, unguided = results["plain"]["fid_domain_guidance"], results["plain"]["fid"]
    assert guided >= 0 and guided != unguided  # another sampler branch, other images
    assert "fid_domain_guidance" not in results["pre-trained (no tuning)"]


def test_demo_reuses_cached_source(tiny_demo: DemoSettings, capsys: pytest.CaptureFixture[str]) -> None:
    settings = tiny_demo
    first = run_demo(settings)
    assert "pre-training" in capsys.readouterr().out
    weights = next(settings.cache_dir.glob("demo-source-*/run/final/ema/transformer/*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    second = run_demo(settings)
    assert "pre-training" not in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == stamp
    # same seed, same cached source and bank: the whole demo is reproducible
    for name in ("plain", "diff-tuning"):
        assert second[name]["fid"] == pytest.approx(first[name]["fid"], rel=1e-4)


def _readme_block_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(marker) :]
    return re.search(r"```bash\n(.*?)\n```", after, re.S).group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    readme_command = _readme_block_after("Run the tests")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert readme_command in ci_lines


def test_readme_demo_command_runs_the_demo() -> None:
    command = _readme_block_after("Run the built-in demo")
    assert "pip install torch==2.13.0" in command and command.endswith("difftune demo --out demo_out")


def test_demo_forgetting_probes(tiny_demo: DemoSettings) -> None:
    settings = tiny_demo
    settings.methods = {"plain": {"target_schedule": "uniform", "bank_share": 0.0}}
    settings.forgetting_method = "plain"
    settings.forgetting_fractions = [0.0, 0.5, 1.0]
    results = run_demo(settings)
    swap = json.loads((settings.out / "forgetting_swap.json").read_text())
    assert [r["fraction"] for r in swap["rows"]] == [0.0, 0.5, 1.0]
    # f = 0 never hands over: the same samples as the plain model's final evaluation
    assert swap["rows"][0]["fid"] == pytest.approx(results["plain"]["fid"], rel=1e-6)
    assert -1.0 <= swap["spearman_fid"] <= 1.0
    gap = json.loads((settings.out / "forgetting_gap.json").read_text())
    assert len(gap["rows"]) == 10 and gap["rows"][0]["t_low"] == 0 and gap["rows"][-1]["t_high"] == 999
    for row in gap["rows"]:
        assert row["gap"] == pytest.approx(row["pretrained"] - row["finetuned"])
    assert (settings.out / "forgetting_swap.png").is_file() and (
        settings.out / "forgetting_gap.png"
    ).is_file()
