"""Diff-Tuning across forward processes: the premise and the verdicts on DDPM, flow and EDM sources.

    python scripts/reproduce.py configs/reproduction/flow_digits.yaml      # the runs (each seed once)
    python scripts/reproduce.py configs/reproduction/edm_digits.yaml
    python scripts/reproduce.py configs/reproduction/ddpm_digits_premise.yaml
    python scripts/guidance_scales.py docs/reproduction/flow_digits --seeds 0 1 2 3 4 --scales 1.0 \\
        --json docs/reproduction/flow_digits/scales.json                 # unguided FIDs (optional)
    python scripts/process_study.py      # reads docs/reproduction, writes processes.md and processes.json

All three test beds are the demo's transfer (digits 0-4 -> few-shot digits 5-9) from a source model
of about 1.4M parameters pre-trained by difftune on digits 0-4 (``difftune demo --process ...``).

* **Premise.** The swap probe's FID cost at f = 0.1/0.3/0.5 and the transfer-gap ratio (source model's
  x0 error on held-out target digits / the plain fine-tuned model's) in the log-SNR bins every process
  shares, each with a 95% t interval over seeds.
* **Ports.** How ψ/ξ travel to a process: each port's final FID paired with plain fine-tuning seed by
  seed, each at its own best way of sampling (:mod:`study_grid`). The rule for the recommended port
  of a process (set when 4 of the 5 flow seeds and 1 EDM seed had finished): the paper's index port, unless another port beats it
  significantly (its paired 95% interval against the index port lies below 0), in which case the one
  with the lowest mean difference from plain among those that do.
* **Across processes.** Every method against plain on each process, side by side. The DDPM column
  comes from the study grid's digits cell (there the log-SNR port is the index port itself).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_grid import FRACTIONS, SAMPLING, Cell, _cell_text, cell_markdown, cell_result, swap_cost_lines  # noqa: E402
from study_grid import METHODS as GRID_METHODS  # noqa: E402
from study_grid import premise as grid_premise  # noqa: E402

from difftune.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from difftune.stats import paired_ci  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PORTS = ("diff-tuning", "log-snr", "logit-normal", "data-driven")
PORT_NAMES = {
    "diff-tuning": "power law over the index (the paper's)",
    "log-snr": "power law matched on log-SNR",
    "logit-normal": "logit-normal ±1.1 around the pre-training density",
    "data-driven": "data-driven",
}
METHODS = ("plain", *PORTS, "s=0.5", "retention-only", "distillation")


@dataclass(frozen=True)
class Column:
    """One process on one test bed: the demo's process, the experiment with the premise probes (if
    any), and the cell with every method's runs."""

    process: str
    premise: str | None
    cell: Cell


def _one(process: str, pair: str, experiment: str) -> Cell:
    """A cell whose methods all ran in one experiment."""
    return Cell(process, pair, {m: experiment for m in METHODS if m != "s=0.5"})


def _ddpm_grid(pair: str, experiment: str) -> Column:
    """A DDPM cell of the study grid (its methods, one experiment), without premise probes."""
    return Column("ddpm", None, Cell("DDPM", pair, dict.fromkeys(GRID_METHODS, experiment)))


FORWARD, REVERSE = "digits 0-4 -> 5-9", "digits 5-9 -> 0-4"
PHOTOS, PHOTOS_REVERSE = "photo patches -> digits 5-9", "photo patches -> digits 0-4"
# column label -> what it is; grouped into one comparison table per test bed (the cell's pair)
PROCESSES: dict[str, Column] = {
    "DDPM": Column(
        "ddpm",
        "ddpm_digits_premise",
        Cell(
            "DDPM",
            FORWARD,
            {
                "plain": "digits_domain_guidance",
                "diff-tuning": "digits_domain_guidance",
                **dict.fromkeys(("s=0.5", "retention-only", "data-driven"), "digits_grid"),
                **dict.fromkeys(("logit-normal", "distillation"), "ddpm_digits_premise"),
            },
        ),
    ),
    "flow": Column("flow", "flow_digits", _one("flow", FORWARD, "flow_digits")),
    "EDM": Column("edm", "edm_digits", _one("EDM", FORWARD, "edm_digits")),
    "DDPM (5-9 -> 0-4)": _ddpm_grid(REVERSE, "digits_reverse_grid"),
    "flow (5-9 -> 0-4)": Column("flow", None, _one("flow", REVERSE, "flow_digits_reverse")),
    "EDM (5-9 -> 0-4)": Column("edm", None, _one("EDM", REVERSE, "edm_digits_reverse")),
    "DDPM (photos)": _ddpm_grid(PHOTOS, "photos_main"),
    "flow (photos)": Column("flow", "photos_flow", _one("flow", PHOTOS, "photos_flow")),
    "EDM (photos)": Column("edm", "photos_edm", _one("EDM", PHOTOS, "photos_edm")),
    "DDPM (photos -> 0-4)": _ddpm_grid(PHOTOS_REVERSE, "photos_reverse"),
    "flow (photos -> 0-4)": Column("flow", None, _one("flow", PHOTOS_REVERSE, "photos_flow_reverse")),
    "EDM (photos -> 0-4)": Column("edm", None, _one("EDM", PHOTOS_REVERSE, "photos_edm_reverse")),
    # the EDM photo source pre-trained again and re-run (seeds as they finish), scored unguided as
    # well: the first runs' models were lost before their unguided scoring (docs/reproduction.md 14.6)
    "EDM (photos, re-run)": Column("edm", None, _one("EDM", PHOTOS, "photos_edm_rerun")),
    "EDM (photos -> 0-4, re-run)": Column(
        "edm", None, _one("EDM", PHOTOS_REVERSE, "photos_edm_reverse_rerun")
    ),
}


def _bin_name(row: dict[str, Any]) -> str:
    high, low = row["log_snr_high"], row["log_snr_low"]
    if high is None:
        return f"≥ {low:g}"
    return f"< {high:g}" if low is None else f"{low:g}..{high:g}"


def _interval(values: list[float]) -> list[float]:
    """[mean, low, high] of a 95% t interval (one value: the value three times)."""
    return [float(x) for x in paired_ci(values)] if len(values) > 1 else [values[0]] * 3


def premise(out: Path, experiment: str) -> dict[str, Any] | None:
    """Swap-probe costs at :data:`FRACTIONS` and the transfer-gap ratio per log-SNR bin, with 95% t
    intervals over the seeds that have both probes."""
    return grid_premise(out, experiment, "forgetting_gap_log_snr.json", _bin_name, _interval)


def handover_log_snr(process: str, steps: int = 25) -> dict[float, float]:
    """Where the source model takes over at each of :data:`FRACTIONS` with the demo's sampler of ``process``."""
    from difftune.analysis.forgetting import step_log_snr
    from difftune.demos.sources import SAMPLERS, source_scheduler
    from difftune.sampling.generate import build_scheduler, handover_step

    config = dict(source_scheduler(process).config)
    log_snr = step_log_snr(build_scheduler(SAMPLERS[process], config, (1, 8, 8)), steps)
    return {f: log_snr[handover_step(steps, f)] for f in FRACTIONS}


def premise_markdown(results: dict[str, dict[str, Any]]) -> list[str]:
    """The swap costs and the log-SNR gap ratios of every process, side by side."""
    lines = ["### The premise on each process", "", *swap_cost_lines(results, "process")]
    lines += [
        "",
        "A fraction of the steps is not a noise level: the log-SNR at which the source model takes over, "
        "per f, with each process's sampler (25 steps). Compare costs at similar log-SNR, not at equal f:",
        "",
        "| process | " + " | ".join(f"f = {f}" for f in FRACTIONS) + " |",
        "|---|" + "---|" * len(FRACTIONS),
    ]
    for name in results:
        starts = handover_log_snr(PROCESSES[name].process)
        lines.append(f"| {name} | " + " | ".join(f"{starts[f]:+.1f}" for f in FRACTIONS) + " |")
    bins = list(next(iter(results.values()))["gap_ratio"])
    lines += [
        "",
        "Transfer-gap ratio per log-SNR bin, least noise first: the source model's x0 error on held-out "
        "target digits over the plain fine-tuned model's, with the same noisy inputs; mean [95% t interval] "
        "over seeds. Above 1: the source denoises the target worse than the fine-tuned model at that noise "
        "level.",
        "",
        "| process | " + " | ".join(bins) + " |",
        "|---|" + "---|" * len(bins),
    ]
    for name, r in results.items():
        cells = []
        for b in bins:
            mean, low, high = r["gap_ratio"].get(b, [float("nan")] * 3)
            cells.append(f"{mean:.2f} [{low:.2f}, {high:.2f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def recommended_port(cell: dict[str, Any]) -> dict[str, Any] | None:
    """The port the study recommends (module docstring: index unless another beats it significantly),
    with its difference from plain and from the index port."""
    methods = cell["methods"]
    if "diff-tuning" not in methods or methods["diff-tuning"]["vs_plain_each_at_best"] is None:
        return None
    beats_index = [
        p
        for p in PORTS[1:]
        if p in methods
        and (v := methods[p]["vs_power_each_at_best"]) is not None
        and v["significant"]
        and v["mean"] < 0
    ]
    port = min(beats_index, key=lambda p: methods[p]["vs_plain_each_at_best"]["mean"], default="diff-tuning")
    return {
        "port": port,
        "vs_plain": methods[port]["vs_plain_each_at_best"],
        "vs_index": methods[port]["vs_power_each_at_best"] if port != "diff-tuning" else None,
        "beats_index_significantly": beats_index,
    }


def comparison_markdown(cells: dict[str, dict[str, Any]]) -> list[str]:
    """Every method against plain on every process of one test bed, and each process's recommended port."""
    done = {name: c for name, c in cells.items() if c["seeds"]}
    lines = [
        f"### Every method against plain fine-tuning, per process: {next(iter(done.values()))['pair']}",
        "",
        "Method − plain per seed, each at its own best way of sampling: mean [95% t interval], seeds "
        "better, **sig.** where the interval excludes 0; negative = better. – : not run on that process "
        "(on DDPM's linear schedule the log-SNR port is the index port itself).",
        "",
        "| method | " + " | ".join(f"{n} ({len(c['seeds'])} seeds)" for n, c in done.items()) + " |",
        "|---|" + "---|" * len(done),
    ]
    for method in METHODS[1:]:
        row = [_cell_text(c["methods"].get(method, {}).get("vs_plain_each_at_best")) for c in done.values()]
        label = f"{method}: {PORT_NAMES[method]}" if method in PORT_NAMES else method
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Each port − the index port (the paper's), each at its own best way of sampling:",
        "",
        "| port | " + " | ".join(done) + " |",
        "|---|" + "---|" * len(done),
    ]
    for port in PORTS[1:]:
        row = [_cell_text(c["methods"].get(port, {}).get("vs_power_each_at_best")) for c in done.values()]
        lines.append(f"| {port} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Recommended port (the index port unless another beats it significantly; then the best of those):",
        "",
    ]
    for name, c in done.items():
        rec = recommended_port(c)
        if rec is not None:
            p = rec["vs_plain"]
            verdict = (
                "no significant difference from plain"
                if not p["significant"]
                else ("beats plain significantly" if p["mean"] < 0 else "loses to plain significantly")
            )
            lines.append(
                f"- **{name}:** {rec['port']} ({PORT_NAMES[rec['port']]}); against plain "
                f"{_cell_text(p)}: {verdict}."
            )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reproduction", help="results folder")
    args = parser.parse_args()
    premises = {
        n: p for n, c in PROCESSES.items() if c.premise and (p := premise(args.out, c.premise)) is not None
    }
    cells = {n: cell_result(args.out, c.cell) for n, c in PROCESSES.items()}
    lines = ["# Diff-Tuning across forward processes", ""]
    if premises:
        lines += premise_markdown(premises)
    for pair in dict.fromkeys(c.cell.pair for c in PROCESSES.values()):
        same = {n: c for n, c in cells.items() if c["pair"] == pair}
        if any(c["seeds"] for c in same.values()):
            lines += comparison_markdown(same)
    for name, cell in cells.items():
        if cell["seeds"] and PROCESSES[name].process != "ddpm":  # the DDPM cells' tables are in grid.md
            ways = [w for w in SAMPLING if any(m["fid"][w] for m in cell["methods"].values())]
            lines += cell_markdown(cell, ways)
    text = "\n".join(lines)
    atomic_write_text(args.out / "processes.md", text)
    recommended = {n: recommended_port(c) for n, c in cells.items() if c["seeds"]}
    atomic_write_json(
        args.out / "processes.json", {"premise": premises, "cells": cells, "recommended_port": recommended}
    )
    print(text)


if __name__ == "__main__":
    main()
