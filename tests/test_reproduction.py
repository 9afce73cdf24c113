"""The reproduction study's experiment configs and the summary tables of scripts/reproduce.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from difftune.demos.digits import DemoSettings, MethodSpec

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs" / "reproduction").glob("*.yaml"))


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiments_exist():
    assert len(EXPERIMENTS) >= 4


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_config_is_valid(path: Path):
    spec = yaml.safe_load(path.read_text())
    assert set(spec) <= {"description", "seeds", "settings", "methods", "baseline_from"}
    assert len(spec["seeds"]) >= 3 and all(isinstance(s, int) for s in spec["seeds"])
    settings = DemoSettings(seed=spec["seeds"][0], methods=spec["methods"], **spec.get("settings", {}))
    for overrides in settings.methods.values():
        MethodSpec.parse(overrides)  # raises on an unknown field or an invalid value
    if "plain" not in spec["methods"]:
        base = yaml.safe_load((path.parent / f"{spec['baseline_from']}.yaml").read_text())
        assert "plain" in base["methods"]
        assert base["seeds"] == spec["seeds"]
        # the shared baseline is only comparable if the source model is the same
        assert (
            DemoSettings(**base.get("settings", {})).source_key()
            == DemoSettings(**spec.get("settings", {})).source_key()
        )


def _run(fid: float, curve: list[float]) -> dict:
    return {"fid": fid, "fid_curve": [{"step": 100 * (i + 1), "fid": f} for i, f in enumerate(curve)]}


def test_summary_tables_with_a_shared_baseline(tmp_path: Path):
    reproduce = _load_script()
    base = {"name": "main", "description": "", "methods": ["plain"], "baseline_from": None}
    base["runs"] = {
        0: {"plain": _run(10.0, [30.0, 12.0, 10.0])},
        1: {"plain": _run(20.0, [50.0, 24.0, 20.0])},
    }
    sweep = {"name": "sweep", "description": "", "methods": ["a"], "baseline_from": "main"}
    sweep["runs"] = {0: {"a": _run(9.0, [40.0, 11.0, 9.0])}, 1: {"a": _run(21.0, [60.0, 19.0, 21.0])}}

    text = reproduce.summarise([base, sweep], tmp_path)

    section = text[text.index("## sweep") :]
    # plain comes from the baseline experiment: mean 15, std of (10, 20) = 7.07
    # second half = steps 200 and 300 of 300: plain (12 + 10) / 2 = 11 and (24 + 20) / 2 = 22
    assert "| plain | 15.00 ± 7.07 | 10.00, 20.00 | +0.0% | – | 16.50 ± 7.78 |" in section
    # a: mean 15 as well; it beats plain on seed 0 only; second-half means 10 and 20
    assert "| a | 15.00 ± 8.49 | 9.00, 21.00 | +0.0% | 1/2 | 15.00 ± 7.07 |" in section
    assert "| a | 50.0 ± 14.1 | 15.0 ± 5.7 | 15.0 ± 8.5 |" in section
    # paired: final a − plain = -1, +1 (mean 0, t(0.975, 1) = 12.71 times 1.414 / sqrt(2)); second half -1, -2
    assert "| a | +0.00 [-12.71, +12.71] | 1/2 | no | -1.50 [-7.85, +4.85] | 2/2 | no |" in section
    assert (tmp_path / "sweep" / "convergence.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())[1]["name"] == "sweep"


def test_tuning_table_pairs_each_method_with_its_diff_tuning_run(tmp_path: Path) -> None:
    module = _load_script()
    runs = {
        seed: {
            "plain": _run(10.0 + seed, [12.0]),
            "diff-tuning": _run(9.0 + seed, [11.0]),
            "lora-plain": _run(20.0, [21.0]),
            "lora-dt": _run(20.0 + (1.0 if seed else -1.0), [22.0]),
        }
        for seed in (0, 1, 2)
    }
    runs[0]["lora-dt"].update(trainable_share=0.0123, trainable_parameters=4096)
    exp = {"name": "peft", "methods": list(runs[0]), "runs": runs}
    rows = [line for line in module._tuning_table(exp) if line.startswith("| ")][1:]
    assert rows[0].startswith("| full | ? | 11.00 ± 1.00 | 10.00 ± 1.00 | -1.00 [-1.00, -1.00] | 3/3 | yes |")
    # +1, +1, -1: mean +0.33, t(0.975, 2) = 4.303 times 1.155 / sqrt(3)
    assert rows[1].startswith(
        "| lora | 1.23% (4,096) | 20.00 ± 0.00 | 20.33 ± 1.15 | +0.33 [-2.54, +3.20] | 1/3 | no |"
    )


def test_domain_guidance_table_pairs_each_run_with_and_without_the_guide() -> None:
    module = _load_script()
    runs = {
        seed: {"plain": {**_run(10.0 + seed, [12.0]), "fid_domain_guidance": 9.0 + seed}}
        for seed in (0, 1, 2)
    }
    runs[1]["plain"]["fid_domain_guidance"] = 11.5  # with − without: -1, +0.5, -1
    rows = [line for line in module._domain_guidance_table(["plain"], runs) if line.startswith("| plain")]
    # mean -0.5, t(0.975, 2) = 4.303 times 0.866 / sqrt(3)
    assert rows == ["| plain | 11.00 ± 1.00 | 10.50 ± 1.32 | -0.50 [-2.65, +1.65] | 2/3 | no |"]
    assert module._domain_guidance_table(["plain"], {0: {"plain": _run(10.0, [12.0])}}) == []
