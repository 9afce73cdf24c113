"""The study grid: both test beds, both digit pairs, five methods, up to five ways to sample, paired by seed.

    python scripts/study_grid.py               # reads docs/reproduction, writes grid.md and grid.json there

Every cell of :data:`CELLS` names the experiments of ``scripts/reproduce.py`` that hold each
method's runs. A method's final model is scored in up to five ways, each on the same evaluation seeds:

* without guidance (scale 1), from ``<experiment>/scales.json`` as written by
  ``scripts/guidance_scales.py --scales 1.0 --json``;
* with classifier-free guidance at 1.5 (the demo's FID, ``results.json``);
* with domain guidance at 1.5 (the source model as the guidance branch, ``fid_domain_guidance``);
* with either guidance at 2, where ``scales.json`` has it (``--scales 2.0``).

Every method is paired with plain fine-tuning seed by seed, at each way of sampling and with each
at its own best one (lowest mean FID over seeds), with 95% t intervals. The premise section reads
the chain-of-forgetting probes (``forgetting_swap.json``, ``forgetting_gap.json``) of the
experiments in :data:`PREMISE`; the fitting section reads the data-driven runs' fitted schedules.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftune.io.atomic import atomic_write_json, atomic_write_text
from difftune.stats import paired_ci

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("plain", "diff-tuning", "s=0.5", "retention-only", "data-driven")
SAMPLING = ("unguided", "classifier-free 1.5", "domain 1.5", "classifier-free 2", "domain 2")
# the ways of sampling that scripts/guidance_scales.py --json measures: name -> (guidance, scale)
FROM_SCALES = {
    "unguided": ("classifier-free", "1"),
    "classifier-free 2": ("classifier-free", "2"),
    "domain 2": ("domain", "2"),
}
PREMISE = {"digits (0-4 -> 5-9)": "digits_main", "photos (photos -> 5-9)": "photos_main"}
FRACTIONS = (0.1, 0.3, 0.5)


@dataclass(frozen=True)
class Cell:
    """One test bed and digit pair, and the experiment holding each method's runs."""

    test_bed: str
    pair: str
    experiments: dict[str, str]


CELLS = (
    Cell(
        "digits",
        "0-4 -> 5-9",
        {
            "plain": "digits_domain_guidance",
            "diff-tuning": "digits_domain_guidance",
            **dict.fromkeys(("s=0.5", "retention-only", "data-driven"), "digits_grid"),
        },
    ),
    Cell("digits", "5-9 -> 0-4", dict.fromkeys(METHODS, "digits_reverse_grid")),
    Cell("photos", "photos -> 5-9", dict.fromkeys(METHODS, "photos_main")),
    Cell("photos", "photos -> 0-4", dict.fromkeys(METHODS, "photos_reverse")),
)


def method_fids(out: Path, experiment: str, method: str) -> dict[str, dict[int, float]]:
    """Sampling -> seed -> final FID of one method's runs (only what has been measured)."""
    fids: dict[str, dict[int, float]] = {name: {} for name in SAMPLING}
    for seed_dir in sorted((out / experiment).glob("seed*")):
        results = seed_dir / "results.json"
        if not results.is_file():
            continue
        run = json.loads(results.read_text()).get(method)
        if run is None:
            continue
        seed = int(seed_dir.name.removeprefix("seed"))
        fids["classifier-free 1.5"][seed] = run["fid"]
        if "fid_domain_guidance" in run:
            fids["domain 1.5"][seed] = run["fid_domain_guidance"]
    scales = out / experiment / "scales.json"
    measured = json.loads(scales.read_text()).get(method, {}) if scales.is_file() else {}
    for name, (kind, scale) in FROM_SCALES.items():
        fids[name] = {int(seed): fid for seed, fid in measured.get(kind, {}).get(scale, {}).items()}
    return fids


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


def best_sampling(fids: dict[str, dict[int, float]], seeds: list[int]) -> str | None:
    """The way of sampling with the lowest mean FID over ``seeds`` (among those measured on all of them)."""
    done = [name for name in SAMPLING if seeds and all(s in fids[name] for s in seeds)]
    return min(done, key=lambda name: statistics.fmean(fids[name][s] for s in seeds), default=None)


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """``b − a`` over the seeds both have: mean, 95% t interval, seeds where b is lower, significance."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [b[s] - a[s] for s in seeds]
    mean, low, high = (float(v) for v in paired_ci(diffs))
    return {
        "mean": mean,
        "low": low,
        "high": high,
        "better": sum(d < 0 for d in diffs),
        "seeds": len(seeds),
        "significant": low > 0 or high < 0,
    }


def _cell_text(p: dict[str, Any] | None) -> str:
    if p is None:
        return "–"
    star = " **sig.**" if p["significant"] else ""
    return f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}] {p['better']}/{p['seeds']}{star}"


def cell_result(out: Path, cell: Cell) -> dict[str, Any]:
    """Every method's FIDs, its best way of sampling and its paired differences with plain."""
    fids = {m: method_fids(out, exp, m) for m, exp in cell.experiments.items()}
    seeds = sorted(set.intersection(*(set(f["classifier-free 1.5"]) for f in fids.values())))
    best = {m: best_sampling(f, seeds) for m, f in fids.items()}
    result: dict[str, Any] = {"test_bed": cell.test_bed, "pair": cell.pair, "seeds": seeds, "methods": {}}

    def at_best(base: str, method: str) -> dict[str, Any] | None:
        if base not in fids or not (best[base] and best[method]):
            return None
        return paired(fids[base][best[base]], fids[method][best[method]])

    for method, f in fids.items():
        vs_plain = {name: paired(fids["plain"][name], f[name]) for name in SAMPLING}
        result["methods"][method] = {
            "fid": f,
            "best": best[method],
            "vs_plain": vs_plain,
            "vs_plain_each_at_best": at_best("plain", method),
            "vs_power_each_at_best": at_best("diff-tuning", method),
            "domain_vs_classifier_free": paired(f["classifier-free 1.5"], f["domain 1.5"]),
        }
    return result


def cell_markdown(result: dict[str, Any], ways: Sequence[str] = SAMPLING) -> list[str]:
    """The FID table and the paired table of one cell, in the columns of ``ways`` of sampling."""
    seeds = result["seeds"]
    lines = [
        f"### {result['test_bed']}: {result['pair']} (seeds {seeds})",
        "",
        "Final FID, mean ± std over seeds:",
        "",
        "| method | " + " | ".join(ways) + " | best |",
        "|---|" + "---|" * (len(ways) + 1),
    ]
    for method, r in result["methods"].items():
        cells = [
            _mean_std([r["fid"][name][s] for s in seeds]) if all(s in r["fid"][name] for s in seeds) else "–"
            for name in ways
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {r['best'] or '–'} |")
    lines += [
        "",
        "Method − plain per seed (negative = better): mean [95% t interval], seeds better, **sig.** where "
        "the interval excludes 0. The last column pairs each method at its own best way of sampling "
        "with plain at its own best.",
        "",
        "| method | " + " | ".join(ways) + " | each at its best |",
        "|---|" + "---|" * (len(ways) + 1),
    ]
    for method, r in result["methods"].items():
        if method == "plain":
            continue
        cells = [_cell_text(r["vs_plain"][name]) for name in ways] + [_cell_text(r["vs_plain_each_at_best"])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def fit_summary(out: Path, experiment: str) -> dict[str, Any] | None:
    """What fitting the data-driven schedules cost and the shape they took, over an experiment's seeds.

    Reads each seed's ``runs/data-driven/data_schedule.json`` (kept beside the results while the runs
    are). ``psi_high_share``: the share of ψ's mass on t ≥ T/2; ``xi_low_share``: ξ's on t < T/2 (the
    paper's s = 1 power schedules put 0.75 there); ``positive_gap``: bins where the source model's
    loss is higher on the target than on its own samples.
    """
    fits = [
        json.loads(path.read_text())
        for path in sorted((out / experiment).glob("seed*/runs/data-driven/data_schedule.json"))
    ]
    if not fits:
        return None

    def share(fit: dict[str, Any], key: str, high: bool) -> float:
        half = fit["num_timesteps"] / 2
        mass = [w for w, t in zip(fit[key], fit["t_low"], strict=True) if (t >= half) == high]
        return sum(mass) / sum(fit[key])

    return {
        "seeds": len(fits),
        "forward_passes": statistics.fmean(f["forward_passes"] for f in fits),
        "seconds": [f["seconds"] for f in fits],
        "psi_high_share": statistics.fmean(share(f, "psi", True) for f in fits),
        "xi_low_share": statistics.fmean(share(f, "xi", False) for f in fits),
        "positive_gap": statistics.fmean(sum(g > 0 for g in f["gap"]) / len(f["gap"]) for f in fits),
        "uniform": sum(bool(f["uniform"]) for f in fits),
    }


def fit_markdown(fits: dict[str, dict[str, Any]]) -> list[str]:
    """The fitting cost and the fitted shapes of every cell, in one table."""
    lines = [
        "### Data-driven schedules: fitting cost and fitted shape",
        "",
        "Per run, before fine-tuning (one CPU thread per run, two runs sharing a 2-core machine). The "
        "paper's s = 1 power schedules put 0.75 of ψ's mass on t ≥ 500 and 0.75 of ξ's on t < 500; "
        "s = 0.5 puts 0.65 there.",
        "",
        "| cell | seeds | forward passes | seconds (mean, range) | ψ mass on t ≥ 500 | ξ mass on t < 500 | "
        "bins with target loss > bank loss | fell back to uniform |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, f in fits.items():
        sec = f["seconds"]
        lines.append(
            f"| {name} | {f['seeds']} | {f['forward_passes']:.0f} | {statistics.fmean(sec):.1f} "
            f"({min(sec):.1f}–{max(sec):.1f}) | {f['psi_high_share']:.2f} | {f['xi_low_share']:.2f} | "
            f"{f['positive_gap']:.0%} | {f['uniform']}/{f['seeds']} |"
        )
    return lines + [""]


def overview_markdown(cells: list[dict[str, Any]]) -> list[str]:
    """One table per question across every cell: each method against plain with each at its best way of
    sampling, and domain guidance against classifier-free guidance at the same scale."""
    done = [c for c in cells if c["seeds"]]
    header = (
        "| method | "
        + " | ".join(f"{c['test_bed']}: {c['pair']} ({len(c['seeds'])} seeds)" for c in done)
        + " |"
    )
    rule = "|---|" + "---|" * len(done)
    lines = [
        "### Overview",
        "",
        "Method − plain per seed, each at its own best way of sampling (see the cells below for which): "
        "mean [95% t interval], seeds better, **sig.** where the interval excludes 0; negative = better.",
        "",
        header,
        rule,
    ]
    for method in METHODS[1:]:
        row = [_cell_text(c["methods"].get(method, {}).get("vs_plain_each_at_best")) for c in done]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    row = [_cell_text(c["methods"].get("data-driven", {}).get("vs_power_each_at_best")) for c in done]
    lines += [
        "",
        "Data-driven schedules − the paper's power schedules (Diff-Tuning, s = 1), each at its best way of "
        "sampling, per seed:",
        "",
        header,
        rule,
        "| data-driven | " + " | ".join(row) + " |",
        "",
        "Domain guidance − classifier-free guidance (both at 1.5), per seed; negative = domain guidance better:",
        "",
        header,
        rule,
    ]
    for method in METHODS:
        row = [_cell_text(c["methods"].get(method, {}).get("domain_vs_classifier_free")) for c in done]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines + [""]


def _t_bin(row: dict[str, Any]) -> str:
    return f"{row['t_low']}-{row['t_high']}"


def premise(
    out: Path,
    experiment: str,
    gap_file: str = "forgetting_gap.json",
    bin_name: Callable[[dict[str, Any]], str] = _t_bin,
    summarise: Callable[[list[float]], Any] = statistics.fmean,
) -> dict[str, Any] | None:
    """Swap-probe FID cost at :data:`FRACTIONS` (relative to f = 0, with a 95% t interval) and the
    transfer-gap ratio per bin of ``gap_file`` (named by ``bin_name``, over seeds by ``summarise``: the
    mean), over the seeds of ``experiment`` that have both probes."""
    seed_dirs = [
        d
        for d in sorted((out / experiment).glob("seed*"))
        if (d / "forgetting_swap.json").is_file() and (d / gap_file).is_file()
    ]
    if not seed_dirs:
        return None
    costs: dict[float, list[float]] = {f: [] for f in FRACTIONS}
    ratios: dict[str, list[float]] = {}
    for d in seed_dirs:
        swap = {
            round(p["fraction"], 2): p["fid"]
            for p in json.loads((d / "forgetting_swap.json").read_text())["rows"]
        }
        for f in FRACTIONS:
            costs[f].append(swap[f] / swap[0.0] - 1)
        for row in json.loads((d / gap_file).read_text())["rows"]:
            ratios.setdefault(bin_name(row), []).append(row["pretrained"] / row["finetuned"])
    return {
        "seeds": [int(d.name.removeprefix("seed")) for d in seed_dirs],
        "swap_cost": {str(f): [float(x) for x in paired_ci(v)] for f, v in costs.items()},
        "gap_ratio": {name: summarise(v) for name, v in ratios.items()},
    }


def swap_cost_lines(results: dict[str, dict[str, Any]], label: str) -> list[str]:
    """The swap-probe cost table at :data:`FRACTIONS`, one row per entry of ``results`` (named in column ``label``)."""
    lines = [
        "FID cost of letting the source model take the last fraction f of the sampling chain of the plain "
        "fine-tuned model (FID(f) / FID(0) − 1), mean [95% t interval] over seeds:",
        "",
        f"| {label} | seeds | " + " | ".join(f"f = {f}" for f in FRACTIONS) + " |",
        "|---|---|" + "---|" * len(FRACTIONS),
    ]
    for name, r in results.items():
        cells = ["{:+.0%} [{:+.0%}, {:+.0%}]".format(*r["swap_cost"][str(f)]) for f in FRACTIONS]
        lines.append(f"| {name} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def premise_markdown(results: dict[str, dict[str, Any]]) -> list[str]:
    """The swap-probe costs and the gap ratios of each test bed, side by side."""
    lines = ["### The premise: what handing the low-noise end to the source model costs", ""]
    lines += swap_cost_lines(results, "test bed")
    bins = list(next(iter(results.values()))["gap_ratio"])
    lines += [
        "",
        "Transfer-gap ratio (source model's ε-MSE on held-out target digits / the plain fine-tuned model's), "
        "mean over seeds, per t bin:",
        "",
        "| test bed | " + " | ".join(bins) + " |",
        "|---|" + "---|" * len(bins),
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{r['gap_ratio'].get(t, float('nan')):.2f}" for t in bins) + " |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reproduction", help="results folder")
    args = parser.parse_args()
    premises = {name: p for name, exp in PREMISE.items() if (p := premise(args.out, exp)) is not None}
    cells = [cell_result(args.out, cell) for cell in CELLS]
    fits = {
        f"{cell.test_bed}: {cell.pair}": fit
        for cell in CELLS
        if (fit := fit_summary(args.out, cell.experiments["data-driven"])) is not None
    }
    lines = ["# The study grid", ""]
    if premises:
        lines += premise_markdown(premises)
    if any(c["seeds"] for c in cells):
        lines += overview_markdown(cells)
    if fits:
        lines += fit_markdown(fits)
    for result in cells:
        if result["seeds"]:
            lines += cell_markdown(result)
    text = "\n".join(lines)
    atomic_write_text(args.out / "grid.md", text)
    atomic_write_json(args.out / "grid.json", {"premise": premises, "data_driven_fits": fits, "cells": cells})
    print(text)


if __name__ == "__main__":
    main()
