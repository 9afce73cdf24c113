"""The continual study (docs/reproduction.md §16): digits as a stream, every method as a task sequence.

A DiT pre-trained on digits 0-1 (2 label rows, the demo's architecture and pre-training) learns the
tasks {2,3}, {4,5}, {6,7}, {8,9} in turn, 20 images per class, each stage from the previous stage's
model. Every method runs as one ``difftune continual`` sequence per seed; after every stage the model
is scored (FID on digit-classifier features, unguided) on the source digits and on every task seen.
The table compares, per seed, each method with plain sequential fine-tuning: paired differences of
the final average FID, the average forgetting, the source's FID and forgetting, and backward and
forward transfer, with 95% t intervals.

    python scripts/continual_study.py --seeds 0 1 2 3 4            # run (resumes), then summarise
    python scripts/continual_study.py --summarise-only             # rebuild the tables
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from difftune.continual.measures import ScoreMatrix  # noqa: E402
from difftune.stats import paired_ci  # noqa: E402

TASKS = [[2, 3], [4, 5], [6, 7], [8, 9]]
BANK_SAMPLES = 500
# method -> (objective settings, bank policy)
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "plain": ({"target_schedule": "uniform", "bank_share": 0.0}, "pretrained"),
    "diff-tuning": ({}, "pretrained"),
    "diff-tuning-previous": ({}, "previous"),
    "diff-tuning-accumulate": ({}, "accumulate"),
    "replay-only": ({"target_schedule": "uniform", "bank_schedule": "uniform"}, "pretrained"),
    "data-driven": ({"target_schedule": "data_driven", "bank_schedule": "data_driven"}, "pretrained"),
    "distillation": ({"kind": "distillation"}, "pretrained"),
}
MEASURES = {  # summary key -> (label, better when)
    "final_average": ("average FID over the 4 tasks after the last stage", "lower"),
    "average_forgetting": ("average forgetting of tasks 1-3 (FID rise since their best)", "lower"),
    "source": ("FID on the source digits 0-1 after the last stage", "lower"),
    "source_forgetting": ("source forgetting (FID rise since the pre-trained model)", "lower"),
    "learning": ("mean FID of each task right after its own stage (plasticity)", "lower"),
    "bwt": ("backward transfer (mean FID gain of tasks 1-3 from later stages)", "higher"),
    "fwt": ("forward transfer (FID gain of a new task before its stage vs the source)", "higher"),
}


def study_settings(seed: int) -> Any:
    """The demo settings of the 0-1 source (shared by every seed: source_seed 0)."""
    from difftune.demos.settings import DemoSettings

    return DemoSettings(seed=seed, source_seed=0, source_classes=[0, 1], target_classes=[2, 3])


def classifier(out: Path) -> Path:
    """The FID features: a digit classifier trained on all of scikit-learn's digits (one for all runs)."""
    path = out / "digits_classifier.safetensors"
    if not path.is_file():
        from difftune.data.builtin import load_sklearn_digits
        from difftune.metrics.digits import save_classifier, train_digit_classifier

        images, labels = load_sklearn_digits()
        out.mkdir(parents=True, exist_ok=True)
        save_classifier(train_digit_classifier(images, labels, steps=1500, seed=0), path)
    return path


def sequence_config(out: Path, seed: int, method: str, source: Path, features: Path, steps: int) -> Path:
    """Write the sequence config of one method and seed; return its path."""
    objective, policy = METHODS[method]
    raw = {
        "model": {"pretrained": str(source), "subfolder": "ema/transformer"},
        "data": {"source": "digits", "per_class": 20, "seed": seed},
        "bank": {"num_samples": BANK_SAMPLES, "sampling": {"seed": seed}},
        "objective": objective,
        "train": {
            "output_dir": str(out / f"seed{seed}" / method),
            "max_steps": steps,
            "batch_size": 32,
            "learning_rate": 3e-4,
            "ema_decay": 0.99,
            "seed": seed,
            "checkpoint_every": 0,
            "keep_checkpoints": 1,
            "log_every": 50,
        },
        "tasks": [{"name": f"{a}-{b}", "data": {"classes": [a, b]}} for a, b in TASKS],
        "continual": {
            "bank_policy": policy,
            **({"bank_cap": BANK_SAMPLES} if policy == "accumulate" else {}),
            "features": f"digits:{features}",
            "samples_per_class": 60,
            "sampling": {"guidance_scale": 1.0, "seed": seed},
            "source_data": {"source": "digits", "classes": [0, 1]},
            "seed": seed,
        },
    }
    path = out / f"seed{seed}" / f"{method}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(out: Path, seeds: list[int], methods: list[str], steps: int) -> None:
    """Run every (seed, method) sequence (finished ones are kept)."""
    from difftune.continual.plan import load_sequence
    from difftune.continual.runner import run_sequence
    from difftune.demos.digits import pretrain_source

    features = classifier(out)
    for seed in seeds:
        source = pretrain_source(study_settings(seed))
        for method in methods:
            start = time.time()
            config = sequence_config(out, seed, method, source, features, steps)
            run_sequence(load_sequence(config), progress=False)
            print(f"seed {seed} {method}: {time.time() - start:.0f} s", flush=True)


def _cell(values: list[float]) -> str:
    mean, low, high = paired_ci(values)
    significant = low > 0 or high < 0
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]{' sig.' if significant else ''}"


def plot_stages(out: Path, results: dict[str, dict[int, dict[str, Any]]]) -> None:
    """``stages.png``: mean over seeds, after each stage, of the average FID over the tasks seen and of
    the FID on the source, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method in [m for m in METHODS if m in results]:
        runs = list(results[method].values())
        stages = range(len(runs[0]["scores"]))
        curves = {
            "average FID over the tasks seen": [
                statistics.fmean(statistics.fmean(r["scores"][i][1 : i + 1]) for r in runs)
                for i in stages
                if i
            ],
            "FID on the newest task": [
                statistics.fmean(r["scores"][i][i] for r in runs) for i in stages if i
            ],
            "FID on the source (digits 0-1)": [
                statistics.fmean(r["scores"][i][0] for r in runs) for i in stages
            ],
        }
        for ax, (title, values) in zip(axes, curves.items(), strict=True):
            first = 0 if title.startswith("FID on the source") else 1
            ax.plot(range(first, first + len(values)), values, marker="o", label=method)
            ax.set_title(title)
            ax.set_xticks(range(len(TASKS) + 1))
            ax.set_xlabel("after stage (0 = the source model)")
    axes[0].set_ylabel("FID (lower is better)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "stages.png", dpi=100)
    plt.close(fig)


def summarise(out: Path) -> dict[str, Any]:
    """Per-method means and method − plain paired intervals; writes summary.json and summary.md."""
    from difftune.demos.report import environment

    results: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(out.glob("seed*/*/measures.json")):
        seed, method = int(path.parent.parent.name[4:]), path.parent.name
        matrix = ScoreMatrix.read(path)
        if len(matrix.stages) == len(TASKS) + 1:
            summary = matrix.to_dict()["summary"]
            summary["learning"] = statistics.fmean(matrix.scores[j][j] for j in range(1, len(TASKS) + 1))
            results.setdefault(method, {})[seed] = {
                "summary": summary,
                "scores": matrix.scores,
            }
    plain = results.get("plain", {})
    lines = [
        "| method | seeds | " + " | ".join(f"{key}" for key in MEASURES) + " |",
        "|---|---|" + "---|" * len(MEASURES),
    ]
    table: dict[str, Any] = {}
    for method in [m for m in METHODS if m in results]:
        seeds = sorted(results[method])
        row, cells = {}, []
        for key in MEASURES:
            values = [results[method][s]["summary"][key] for s in seeds]
            row[key] = {"mean": statistics.fmean(values), "per_seed": values}
            if method != "plain":
                shared = [s for s in seeds if s in plain]
                diffs = [results[method][s]["summary"][key] - plain[s]["summary"][key] for s in shared]
                row[key]["minus_plain"] = diffs
                cells.append(
                    f"{statistics.fmean(values):.2f} ({_cell(diffs)})"
                    if len(diffs) > 1
                    else f"{statistics.fmean(values):.2f}"
                )
            else:
                cells.append(f"{statistics.fmean(values):.2f}")
        table[method] = row
        lines.append(f"| {method} | {len(seeds)} | " + " | ".join(cells) + " |")
    legend = [f"- `{key}`: {label} ({better} is better)" for key, (label, better) in MEASURES.items()]
    text = "\n".join(
        [
            "Mean over seeds; in brackets, method − plain per seed: mean [95% t interval].",
            "",
            *lines,
            "",
            *legend,
        ]
    )
    plot_stages(out, results)
    summary = {"methods": table, "environment": environment(), "tasks": TASKS}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reproduction" / "continual_digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=300, help="training steps per stage")
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args()
    if not args.summarise_only:
        run(args.out, args.seeds, args.methods, args.steps)
    summarise(args.out)


if __name__ == "__main__":
    main()
