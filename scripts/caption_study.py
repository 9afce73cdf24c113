"""The text-to-image test bed over seeds: plain vs Diff-Tuning (caption bank) vs Diff-Tuning
(``class_swap`` bank) vs DreamBooth's prior preservation, on target FID and a forgetting score.

    python scripts/caption_study.py                              # seeds 0-4 into docs/reproduction/caption_bed
    python scripts/caption_study.py --seeds 5 6 --out runs/caption_study
    python scripts/caption_study.py --summarise-only

Each seed runs :func:`difftune.demos.caption_bed.run_caption_bed` (the source model is pre-trained once,
with ``source_seed`` 0, and cached); a seed whose ``results.json`` has every method is not run again, and
one that lacks a method (added to the settings later) runs that method only. ``summary.md``
gives each method's mean ± std over seeds and, for the pairs below, the per-seed paired differences with
their 95% t intervals and the number of seeds on which the first method did better (lower). The package
versions are in each seed's ``run_info.json``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from difftune.demos.caption_bed import CaptionBedSettings, run_caption_bed
from difftune.demos.seeds import run_seeds
from difftune.stats import paired_ci

ROOT = Path(__file__).resolve().parents[1]
MEASURES = {
    "target_fid": "target FID",
    "forgetting": "forgetting",
    "prior_fid": "prior FID",
}
PAIRS = (
    ("diff-tuning", "plain"),
    ("diff-tuning class_swap", "plain"),
    ("prior preservation", "plain"),
    ("diff-tuning class_swap", "diff-tuning"),
    ("diff-tuning class_swap", "prior preservation"),
    ("psi + prior preservation", "prior preservation"),
    ("psi + prior preservation", "plain"),
)


def summarise(runs: dict[int, dict[str, Any]]) -> str:
    """The study's tables (markdown) from each seed's ``results.json``."""
    seeds = sorted(runs)
    methods = list(runs[seeds[0]])
    lines = [
        f"Seeds {seeds}; every score is an FID on the test bed's digit features (lower is better).",
        "",
        "| method | " + " | ".join(MEASURES.values()) + " |",
        "|---|" + "---|" * len(MEASURES),
    ]
    for m in methods:
        cells = []
        for key in MEASURES:
            values = [runs[s][m][key] for s in seeds]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.2f} ± {spread:.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences (first − second; negative = the first is better), 95% t interval over seeds:",
        "",
        "| pair | measure | mean difference | 95% CI | seeds better | significant |",
        "|---|---|---|---|---|---|",
    ]
    for first, second in PAIRS:
        if first not in methods or second not in methods:
            continue
        for key, label in MEASURES.items():
            diffs = [runs[s][first][key] - runs[s][second][key] for s in seeds]
            mean, low, high = paired_ci(diffs)
            significant = "yes" if high < 0 or low > 0 else "no"
            lines.append(
                f"| {first} − {second} | {label} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | "
                f"{sum(d < 0 for d in diffs)}/{len(diffs)} | {significant} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reproduction" / "caption_bed")
    parser.add_argument("--cache-dir", type=Path, help="source-model cache (default ~/.cache/difftune)")
    parser.add_argument("--summarise-only", action="store_true", help="only rebuild the tables")
    args = parser.parse_args()
    runs = run_seeds(
        args.out,
        args.seeds,
        lambda out, seed: run_caption_bed(CaptionBedSettings(out=out, cache_dir=args.cache_dir, seed=seed)),
        args.summarise_only,
        complete=lambda results: (
            set(CaptionBedSettings().methods) <= set(results)
        ),  # a method added later runs
    )
    text = summarise(runs)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
