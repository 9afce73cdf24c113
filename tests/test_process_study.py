"""scripts/process_study.py: the premise in log-SNR bins and the recommended port, from finished runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "scripts"))  # it imports study_grid beside it
    spec = importlib.util.spec_from_file_location("process_study", ROOT / "scripts" / "process_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _runs(out: Path, fids: dict[str, list[float]]) -> None:
    """Three seeds of one experiment ``exp``: each method's final FID (guidance 1.5) and the probes."""
    for seed in range(3):
        d = out / "exp" / f"seed{seed}"
        _write(d / "results.json", {m: {"fid": v[seed], "fid_curve": []} for m, v in fids.items()})
        swap = [
            {"fraction": f, "fid": fid}
            for f, fid in ((0.0, 40.0), (0.1, 40.0 + seed), (0.3, 60.0), (0.5, 80.0))
        ]
        _write(d / "forgetting_swap.json", {"rows": swap})
        gap = [
            {"log_snr_high": None, "log_snr_low": 0.0, "pretrained": 2.0 + seed, "finetuned": 1.0},
            {"log_snr_high": 0.0, "log_snr_low": None, "pretrained": 3.0, "finetuned": 2.0},
        ]
        _write(d / "forgetting_gap_log_snr.json", {"rows": gap})


def test_premise_reads_swap_costs_and_log_snr_gap_ratios(study, tmp_path: Path) -> None:
    _runs(tmp_path, {"plain": [1.0, 1.0, 1.0]})
    premise = study.premise(tmp_path, "exp")
    assert premise["seeds"] == [0, 1, 2]
    mean, low, high = premise["swap_cost"]["0.1"]  # costs 0, 2.5%, 5%
    assert mean == pytest.approx(0.025) and low < mean < high
    assert premise["swap_cost"]["0.3"] == pytest.approx([0.5, 0.5, 0.5])
    assert list(premise["gap_ratio"]) == ["≥ 0", "< 0"]  # least noise first, open-ended bins named
    assert premise["gap_ratio"]["≥ 0"][0] == pytest.approx(3.0) and premise["gap_ratio"]["< 0"][0] == 1.5
    assert study.premise(tmp_path, "missing") is None


def _cell(study, tmp_path: Path, fids: dict[str, list[float]]) -> dict:
    _runs(tmp_path, fids)
    return study.cell_result(tmp_path, study.Cell("flow", "p", dict.fromkeys(fids, "exp")))


def test_the_index_port_stays_recommended_unless_another_beats_it_significantly(
    study, tmp_path: Path
) -> None:
    # logit-normal is lower on average but not on every seed; data-driven is worse
    fids = {
        "plain": [50.0, 52.0, 48.0],
        "diff-tuning": [45.0, 50.0, 47.0],
        "logit-normal": [40.0, 52.0, 44.0],
        "data-driven": [55.0, 56.0, 50.0],
    }
    rec = study.recommended_port(_cell(study, tmp_path / "a", fids))
    assert rec["port"] == "diff-tuning" and rec["beats_index_significantly"] == []
    # now logit-normal is 3 lower than the index port on every seed, log-SNR 1 lower: both significant
    fids["logit-normal"] = [42.0, 47.0, 44.0]
    fids["log-snr"] = [44.0, 49.0, 46.0]
    rec = study.recommended_port(_cell(study, tmp_path / "b", fids))
    assert rec["port"] == "logit-normal" and sorted(rec["beats_index_significantly"]) == [
        "log-snr",
        "logit-normal",
    ]
    assert rec["vs_index"]["mean"] == pytest.approx(-3.0) and rec["vs_plain"]["mean"] == pytest.approx(
        -5.0 - 2 / 3
    )
