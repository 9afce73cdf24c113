"""The controllable demo over seeds: ControlNet convergence of plain / Diff-Tuning / inverse-SNR.

    python scripts/controlnet_study.py                        # seeds 0 1 2 into docs/reproduction/controlnet
    python scripts/controlnet_study.py --seeds 0 1 2 3 4 --out runs/controlnet_study
    python scripts/controlnet_study.py --summarise-only

Each seed runs ``difftune demo controlnet --seed k`` (the source model is shared: pre-trained once
with ``source_seed`` 0); a seed whose ``results.json`` exists is not run again. ``summary.md`` gives,
per method, the sudden-convergence step (how many seeds converged, and the mean over those), the
change point, the area under the 1 - edge F1 curve and its final value (mean ± std over seeds), and,
against plain training, the per-seed paired differences of the area and of the change point with
their 95% t intervals and the number of seeds on which the method did better. The package versions are in each seed's
``run_info.json``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from difftune.demos.controlnet import ControlDemoSettings, run_control_demo
from difftune.demos.seeds import run_seeds
from difftune.stats import paired_ci

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "plain"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {spread:.4f}"


def _steps(values: list[int | None]) -> str:
    reached = [v for v in values if v is not None]
    mean = f", mean {statistics.fmean(reached):.0f}" if reached else ""
    return f"{len(reached)}/{len(values)} seeds{mean}"


def summarise(runs: dict[int, dict[str, Any]], threshold: float) -> str:
    """The study's tables (markdown) from each seed's ``results.json``."""
    methods = list(next(iter(runs.values())))
    seeds = sorted(runs)
    lines = [
        f"Seeds {seeds}. Curve: 1 - edge F1 (lower is better); sudden convergence: the first validation step "
        f"from which it stays <= {threshold:g}.",
        "",
        "| method | converged (seeds, mean step) | change point (seeds, mean step) | area | final |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        rows = [runs[s][m] for s in seeds]
        lines.append(
            f"| {m} | {_steps([r['step'] for r in rows])} | {_steps([r['changepoint'] for r in rows])} | "
            f"{_mean_std([r['area'] for r in rows])} | {_mean_std([r['final'] for r in rows])} |"
        )
    if BASELINE in methods:
        lines += [
            "",
            f"Paired differences against {BASELINE} (method − {BASELINE}; negative = follows the edges sooner), "
            "95% t interval over seeds (the change point over the seeds where both runs have one):",
            "",
            "| method | measure | mean difference | 95% CI | seeds better | significant |",
            "|---|---|---|---|---|---|",
        ]
        for m in methods:
            if m == BASELINE:
                continue
            for measure, fmt in (("area", "+.4f"), ("changepoint", "+.0f")):
                pairs = [(runs[s][m][measure], runs[s][BASELINE][measure]) for s in seeds]
                diffs = [a - b for a, b in pairs if a is not None and b is not None]
                if not diffs:
                    continue
                mean, low, high = paired_ci(diffs)
                better = sum(d < 0 for d in diffs)
                significant = "yes" if high < 0 or low > 0 else "no"
                lines.append(
                    f"| {m} | {measure} | {mean:{fmt}} | [{low:{fmt}}, {high:{fmt}}] | {better}/{len(diffs)} | "
                    f"{significant} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reproduction" / "controlnet")
    parser.add_argument("--cache-dir", type=Path, help="source-model cache (default ~/.cache/difftune)")
    parser.add_argument("--summarise-only", action="store_true", help="only rebuild the tables")
    args = parser.parse_args()
    runs = run_seeds(
        args.out,
        args.seeds,
        lambda out, seed: run_control_demo(ControlDemoSettings(out=out, cache_dir=args.cache_dir, seed=seed)),
        args.summarise_only,
    )
    text = summarise(runs, ControlDemoSettings().threshold)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
