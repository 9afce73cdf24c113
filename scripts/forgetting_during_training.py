"""Forgetting and held-out losses over training (train.eval_every): plain vs Diff-Tuning vs retention only.

    python scripts/forgetting_during_training.py --runs /tmp/forgetting_runs     # the runs, then the table
    python scripts/forgetting_during_training.py --runs /tmp/forgetting_runs --summarise-only

The demo's DDPM transfer (digits 0-4 -> few-shot 5-9, 600 steps, batch 32, lr 3e-4, EMA 0.99) from the
source and banks that ``difftune demo`` caches (run it first), with ``train.eval_every=100``: 100 bank
samples and 20 target images held out, the forgetting probe on 100 bank samples, ``keep_best: loss``.
Prints each method's final scores minus plain's, paired by seed, with 95% t intervals, and writes them
as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from difftune.demos.settings import DemoSettings
from difftune.io.atomic import atomic_write_json
from difftune.stats import paired_ci

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "plain": ["objective.bank_share=0", "objective.target_schedule=uniform"],
    "diff-tuning": [],
    "retention-only": ["objective.target_schedule=uniform"],
}
KEYS = ("eval/forgetting", "eval/loss/bank", "eval/loss/bank/t0-99", "eval/loss/target")


def settings(source: Path, out: Path, seed: int) -> list[str]:
    """The ``--set`` items of one run."""
    return [
        f"model.pretrained={source / 'run' / 'final'}",
        "model.subfolder=ema/transformer",
        "data.source=digits",
        "data.classes=[5,6,7,8,9]",
        "data.per_class=20",
        f"data.seed={seed}",
        f"bank.path={source / f'bank-500-seed{seed}'}",
        "bank.num_samples=500",
        f"train.output_dir={out}",
        "train.batch_size=32",
        "train.max_steps=600",
        "train.learning_rate=3e-4",
        "train.ema_decay=0.99",
        "train.checkpoint_every=0",
        "train.log_every=25",
        f"train.seed={seed}",
        "train.overwrite=true",
        "train.eval_every=100",
        "train.evaluation.bank_holdout=100",
        "train.evaluation.holdout=20",
        "train.evaluation.samples=100",
        "train.keep_best=loss",
    ]


def final_scores(run: Path) -> dict[str, float]:
    """The scores of a run's last evaluation, and the step of its best/."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "eval/forgetting" in r][-1]
    best = json.loads((run / "best" / "best.json").read_text())
    return {**{k: last[k] for k in KEYS}, "best_step": best["step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder for the runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "docs" / "reproduction" / "forgetting_during_training.json"
    )
    args = parser.parse_args()
    source = DemoSettings().resolved_cache() / f"demo-source-{DemoSettings().source_key()}"
    if not args.summarise_only:
        for seed in args.seeds:
            for method, extra in METHODS.items():
                items = settings(source, args.runs / f"seed{seed}" / method, seed) + extra
                cmd = [sys.executable, "-m", "difftune", "train", *(f"--set={item}" for item in items)]
                subprocess.run(cmd, check=True)
    scores = {m: {s: final_scores(args.runs / f"seed{s}" / m) for s in args.seeds} for m in METHODS}
    result: dict = {"seeds": args.seeds, "final": scores, "vs_plain": {}}
    print("| method | " + " | ".join(KEYS) + " | best step (loss) |")
    print("|---|" + "---|" * (len(KEYS) + 1))
    for method in METHODS:
        cells = []
        for key in KEYS:
            values = [scores[method][s][key] for s in args.seeds]
            if method == "plain":
                cells.append(f"{sum(values) / len(values):.4f}")
                continue
            diff = [v - scores["plain"][s][key] for v, s in zip(values, args.seeds, strict=True)]
            mean, low, high = (float(x) for x in paired_ci(diff))
            result["vs_plain"].setdefault(method, {})[key] = [mean, low, high]
            cells.append(f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]")
        steps = [scores[method][s]["best_step"] for s in args.seeds]
        print(f"| {method} | " + " | ".join(cells) + f" | {steps} |")
    atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
