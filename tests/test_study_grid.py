"""scripts/study_grid.py: the grid's tables pair every method with plain by seed, at each way of sampling."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("study_grid", ROOT / "scripts" / "study_grid.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _experiment(out: Path, fids: dict[str, list[tuple[float, float, float]]]) -> None:
    """fids: method -> per seed (unguided, classifier-free 1.5, domain 1.5[, classifier-free 2])."""
    scales: dict = {}
    for seed in range(3):
        results = {
            m: {"fid": v[seed][1], "fid_domain_guidance": v[seed][2], "fid_curve": []}
            for m, v in fids.items()
        }
        _write(out / "exp" / f"seed{seed}" / "results.json", results)
        for m, v in fids.items():
            measured = scales.setdefault(m, {"classifier-free": {"1": {}}})["classifier-free"]
            measured["1"][str(seed)] = v[seed][0]
            if len(v[seed]) > 3:  # classifier-free guidance at 2 as well
                measured.setdefault("2", {})[str(seed)] = v[seed][3]
    _write(out / "exp" / "scales.json", scales)


def test_each_method_is_paired_with_plain_per_sampling_and_each_at_its_best(grid, tmp_path: Path) -> None:
    _experiment(
        tmp_path,
        {
            # plain is best unguided (mean 40); Diff-Tuning is best with classifier-free guidance (mean 44)
            "plain": [(40.0, 50.0, 80.0), (42.0, 52.0, 82.0), (38.0, 48.0, 78.0)],
            "diff-tuning": [(60.0, 45.0, 70.0), (61.0, 42.0, 71.0), (59.0, 45.0, 72.0)],
            # measured at guidance 2 on every seed, but worse there than at 1.5 (mean 50 vs 48)
            "s=0.5": [(60.0, 48.0, 70.0, 50.0), (61.0, 48.0, 71.0, 49.0), (59.0, 48.0, 72.0, 51.0)],
        },
    )
    cell = grid.Cell("photos", "p", {"plain": "exp", "diff-tuning": "exp", "s=0.5": "exp"})
    result = grid.cell_result(tmp_path, cell)
    assert result["seeds"] == [0, 1, 2]
    plain, dt = result["methods"]["plain"], result["methods"]["diff-tuning"]
    assert plain["best"] == "unguided" and dt["best"] == "classifier-free 1.5"
    # same sampling: differences (-5, -10, -3) with classifier-free guidance
    cfg = dt["vs_plain"]["classifier-free 1.5"]
    assert cfg["mean"] == pytest.approx(-6.0) and cfg["better"] == 3 and cfg["seeds"] == 3
    # each at its best: DT with guidance (45, 42, 45) vs plain unguided (40, 42, 38): +5, 0, +7
    best = dt["vs_plain_each_at_best"]
    assert best["mean"] == pytest.approx(4.0) and best["better"] == 0
    assert best["low"] < best["mean"] < best["high"]
    # against the power schedules instead: plain unguided − Diff-Tuning with guidance = -5, 0, -7
    assert plain["vs_power_each_at_best"]["mean"] == pytest.approx(-4.0)
    text = "\n".join(grid.cell_markdown(result))
    assert "| plain | 40.00 ± 2.00 | 50.00 ± 2.00 | 80.00 ± 2.00 | – | – | unguided |" in text
    assert (
        "| s=0.5 | 60.00 ± 1.00 | 48.00 ± 0.00 | 71.00 ± 1.00 | 50.00 ± 1.00 | – | classifier-free 1.5 |"
        in text
    )
    # guidance 2 is paired with plain only where plain has it too
    assert result["methods"]["s=0.5"]["vs_plain"]["classifier-free 2"] is None
    assert "| diff-tuning | +20.00 [" in text  # unguided: 60 - 40, 61 - 42, 59 - 38 = 20, 19, 21
    overview = "\n".join(grid.overview_markdown([result]))
    assert "| photos: p (3 seeds) |" in overview
    assert "| diff-tuning | +4.00 [" in overview  # each at its best, as above
    # domain − classifier-free guidance: plain +30 on every seed; Diff-Tuning +25, +29, +27
    assert "| plain | +30.00 [+30.00, +30.00] 0/3 **sig.** |" in overview
    assert "| diff-tuning | +27.00 [" in overview


def test_a_method_without_runs_leaves_the_cell_to_the_seeds_all_have(grid, tmp_path: Path) -> None:
    _experiment(tmp_path, {"plain": [(1.0, 2.0, 3.0)] * 3})
    result = grid.cell_result(tmp_path, grid.Cell("digits", "p", {"plain": "exp", "diff-tuning": "missing"}))
    assert result["seeds"] == []


def test_premise_reports_the_swap_cost_relative_to_no_swap_and_the_loss_ratio(grid, tmp_path: Path) -> None:
    for seed, base in enumerate((40.0, 50.0)):
        rows = [{"fraction": f / 10, "fid": base * (1 + f / 10)} for f in range(11)]
        _write(tmp_path / "exp" / f"seed{seed}" / "forgetting_swap.json", {"rows": rows})
        gap = [{"t_low": 0, "t_high": 99, "pretrained": 0.3, "finetuned": 0.2 - 0.1 * seed}]
        _write(tmp_path / "exp" / f"seed{seed}" / "forgetting_gap.json", {"rows": gap})
    result = grid.premise(tmp_path, "exp")
    assert result["seeds"] == [0, 1]
    mean, low, high = result["swap_cost"]["0.3"]
    assert mean == pytest.approx(0.3) and low == pytest.approx(0.3) and high == pytest.approx(0.3)
    assert result["gap_ratio"]["0-99"] == pytest.approx((1.5 + 3.0) / 2)


def test_fit_summary_reports_cost_and_where_the_fitted_schedules_put_their_mass(grid, tmp_path: Path) -> None:
    fit = {
        "num_timesteps": 1000,
        "t_low": [0, 250, 500, 750],
        "psi": [1.0, 1.0, 3.0, 3.0],  # 0.75 of ψ on t >= 500
        "xi": [2.0, 2.0, 1.0, 3.0],  # 0.5 of ξ on t < 500
        "gap": [0.1, -0.2, 0.3, -0.1],
        "forward_passes": 320,
        "seconds": 4.0,
        "uniform": False,
    }
    _write(tmp_path / "exp" / "seed0" / "runs" / "data-driven" / "data_schedule.json", fit)
    _write(
        tmp_path / "exp" / "seed1" / "runs" / "data-driven" / "data_schedule.json", {**fit, "seconds": 6.0}
    )
    summary = grid.fit_summary(tmp_path, "exp")
    assert summary["seeds"] == 2 and summary["forward_passes"] == 320 and summary["seconds"] == [4.0, 6.0]
    assert summary["psi_high_share"] == pytest.approx(0.75) and summary["xi_low_share"] == pytest.approx(0.5)
    assert summary["positive_gap"] == pytest.approx(0.5) and summary["uniform"] == 0
    assert "| c | 2 | 320 | 5.0 (4.0–6.0) | 0.75 | 0.50 | 50% | 0/2 |" in "\n".join(
        grid.fit_markdown({"c": summary})
    )
    assert grid.fit_summary(tmp_path, "none") is None


def test_guidance_scales_json_adds_new_scales_to_what_the_file_holds() -> None:
    spec = importlib.util.spec_from_file_location("guidance_scales", ROOT / "scripts" / "guidance_scales.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    old = {"plain": {"classifier-free": {"1": {"0": 40.0, "1": 41.0}}}}
    new = {"plain": {"classifier-free": {"2": {"0": 50.0}, "1": {"1": 42.0}}, "domain": {"2": {"0": 60.0}}}}
    merged = module.merge_fids(old, new)
    assert merged == {
        "plain": {
            "classifier-free": {"1": {"0": 40.0, "1": 42.0}, "2": {"0": 50.0}},
            "domain": {"2": {"0": 60.0}},
        }
    }
    assert old == {"plain": {"classifier-free": {"1": {"0": 40.0, "1": 41.0}}}}  # not modified in place
