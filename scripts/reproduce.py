"""Run the reproduction study: every experiment config in configs/reproduction/, each over its seeds.

    python scripts/reproduce.py                       # all experiments
    python scripts/reproduce.py configs/reproduction/digits_main.yaml
    python scripts/reproduce.py --summarise-only      # rebuild the tables from finished runs
    python scripts/reproduce.py configs/reproduction/photos_main.yaml --seeds 0 1   # some seeds only

An experiment config holds ``settings`` (fields of :class:`difftune.demos.digits.DemoSettings`), ``methods``
(method name -> objective overrides) and ``seeds``. Runs go to ``<out>/<experiment>/seed<k>``;
a finished run (its results.json exists) is not run again. ``<out>/summary.md`` covers every
experiment with finished runs: per method the final FID (mean and standard deviation over seeds,
change relative to plain fine-tuning, seeds on which it beats plain) and FID over fine-tuning steps,
with a convergence plot in ``<out>/<experiment>/convergence.png``. Because the FID of one checkpoint
is noisy, the table also gives each method's mean FID over the checkpoints of the second half of
training (per seed, then mean ± std over seeds). An experiment without a plain
method takes plain fine-tuning from the experiment named by ``baseline_from`` (same seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from difftune.demos.digits import DemoSettings, run_demo
from difftune.stats import paired_ci

ROOT = Path(__file__).resolve().parents[1]


def run_experiment(config: Path, out: Path, cache: Path | None, seeds: list[int] | None = None) -> None:
    """Run every seed of one experiment (or those of ``seeds`` it has) that has no ``results.json`` yet."""
    spec = yaml.safe_load(config.read_text())
    for seed in [s for s in spec["seeds"] if seeds is None or s in seeds]:
        run_dir = out / config.stem / f"seed{seed}"
        if not (run_dir / "results.json").is_file():
            run_demo(
                DemoSettings(
                    out=run_dir,
                    cache_dir=cache,
                    seed=seed,
                    methods=spec["methods"],
                    **spec.get("settings", {}),
                )
            )


def collect(config: Path, out: Path) -> dict[str, Any]:
    """The finished runs of one experiment (seed -> results.json) and its description."""
    spec = yaml.safe_load(config.read_text())
    name = config.stem
    done = {seed: out / name / f"seed{seed}" / "results.json" for seed in spec["seeds"]}
    return {
        "name": name,
        "description": spec.get("description", ""),
        "runs": {seed: json.loads(path.read_text()) for seed, path in done.items() if path.is_file()},
        "methods": list(spec["methods"]),
        "baseline_from": spec.get("baseline_from"),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _with_baseline(
    exp: dict[str, Any], by_name: dict[str, dict[str, Any]]
) -> tuple[list[str], dict[int, dict[str, Any]]]:
    """The experiment's methods and runs, with plain fine-tuning (its own or ``baseline_from``'s) first."""
    runs = {seed: dict(r) for seed, r in exp["runs"].items()}
    methods = list(exp["methods"])
    if "plain" not in methods:
        base = by_name.get(exp["baseline_from"], {}).get("runs", {})
        for seed, r in runs.items():
            if "plain" in base.get(seed, {}):
                r["plain"] = base[seed]["plain"]
        if any("plain" in r for r in runs.values()):
            methods.insert(0, "plain")
    return methods, runs


def _late_mean(result: dict[str, Any]) -> float:
    """Mean FID of one run over its checkpoints in the second half of training (steps > last step / 2)."""
    curve = result["fid_curve"]
    half = curve[-1]["step"] / 2
    return statistics.fmean(p["fid"] for p in curve if p["step"] > half)


def _fid_table(methods: list[str], runs: dict[int, dict[str, Any]]) -> list[str]:
    """Final FID per method: mean ± std over seeds, per seed, change vs plain, seeds that beat plain,
    and the mean FID over the second half of the checkpoints (less exposed to one checkpoint's noise)."""
    lines = [
        "| method | FID mean ± std | per seed | vs plain | seeds better than plain | second-half mean ± std |",
        "|---|---|---|---|---|---|",
    ]
    plain = [r["plain"]["fid"] for r in runs.values() if "plain" in r]
    for method in methods:
        fids = [r[method]["fid"] for r in runs.values() if method in r]
        mean, std = _mean_std(fids)
        rel = f"{100 * (mean - statistics.fmean(plain)) / statistics.fmean(plain):+.1f}%" if plain else "n/a"
        paired = [r[method]["fid"] < r["plain"]["fid"] for r in runs.values() if method in r and "plain" in r]
        wins = f"{sum(paired)}/{len(paired)}" if paired and method != "plain" else "–"
        late = "{:.2f} ± {:.2f}".format(
            *_mean_std([_late_mean(r[method]) for r in runs.values() if method in r])
        )
        lines.append(
            f"| {method} | {mean:.2f} ± {std:.2f} | {', '.join(f'{f:.2f}' for f in fids)} | {rel} | {wins} | {late} |"
        )
    return lines


def _paired_cell(diffs: list[float]) -> str:
    """``mean [low, high] | better/n | significant`` of per-seed differences (negative = lower FID)."""
    mean, low, high = paired_ci(diffs)
    significant = "yes" if low > 0 or high < 0 else "no"
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] | {sum(d < 0 for d in diffs)}/{len(diffs)} | {significant}"


def _paired_table(methods: list[str], runs: dict[int, dict[str, Any]]) -> list[str]:
    """Each method against plain, paired by seed, on the final FID and on the second-half mean, with 95%
    t intervals and whether each is significant (the interval excludes 0)."""
    paired = {m: [s for s, r in runs.items() if m in r and "plain" in r] for m in methods if m != "plain"}
    if not any(len(seeds) >= 2 for seeds in paired.values()):
        return []
    lines = [
        "Paired against plain (method − plain per seed; negative = better), 95% t interval:",
        "",
        "| method | final FID: mean difference [95% CI] | seeds better | significant | second-half mean: "
        "mean difference [95% CI] | seeds better | significant |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, seeds in paired.items():
        if len(seeds) < 2:
            continue
        final = [runs[s][method]["fid"] - runs[s]["plain"]["fid"] for s in seeds]
        late = [_late_mean(runs[s][method]) - _late_mean(runs[s]["plain"]) for s in seeds]
        lines.append(f"| {method} | {_paired_cell(final)} | {_paired_cell(late)} |")
    return lines + [""]


def _convergence(methods: list[str], runs: dict[int, dict[str, Any]]) -> dict[str, dict[int, list[float]]]:
    """method -> step -> FID of every seed at that step."""
    curves: dict[str, dict[int, list[float]]] = {}
    for method in methods:
        for r in runs.values():
            for point in r.get(method, {}).get("fid_curve", []):
                curves.setdefault(method, {}).setdefault(point["step"], []).append(point["fid"])
    return curves


def _convergence_table(curves: dict[str, dict[int, list[float]]]) -> list[str]:
    steps = sorted({step for by_step in curves.values() for step in by_step})
    lines = ["| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for method, by_step in curves.items():
        cells = ["{:.1f} ± {:.1f}".format(*_mean_std(by_step[s])) if s in by_step else "–" for s in steps]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _plot_convergence(curves: dict[str, dict[int, list[float]]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_step in curves.items():
        steps = sorted(by_step)
        mean_std = [_mean_std(by_step[s]) for s in steps]
        means = [m for m, _ in mean_std]
        ax.plot(steps, means, marker="o", label=method)
        ax.fill_between(steps, [m - s for m, s in mean_std], [m + s for m, s in mean_std], alpha=0.15)
    ax.set(xlabel="fine-tuning step", ylabel="FID (mean ± std over seeds)", title=title, yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tuning_pairs(methods: list[str]) -> list[tuple[str, str, str]]:
    """``(tuning method, its plain run, its Diff-Tuning run)`` for methods named ``<m>-plain`` / ``<m>-dt``
    (full fine-tuning: ``plain`` / ``diff-tuning``)."""
    pairs = [("full", "plain", "diff-tuning")] if {"plain", "diff-tuning"} <= set(methods) else []
    return pairs + [
        (m[: -len("-plain")], m, m[: -len("-plain")] + "-dt")
        for m in methods
        if m.endswith("-plain") and m[: -len("-plain")] + "-dt" in methods
    ]


def _share(runs: dict[int, dict[str, Any]], method: str) -> str:
    """The trainable share of ``method``'s runs, as their ``results.json`` records it ("?" for runs
    made before it was recorded)."""
    for seed in sorted(runs):
        result = runs[seed].get(method, {})
        if "trainable_share" in result:
            return f"{100 * result['trainable_share']:.2f}% ({result['trainable_parameters']:,})"
    return "?"


def _tuning_table(exp: dict[str, Any]) -> list[str]:
    """Diff-Tuning on top of each tuning method: final FID plain vs Diff-Tuning, paired over seeds."""
    pairs, runs = _tuning_pairs(exp["methods"]), exp["runs"]
    if not pairs:
        return []
    lines = [
        "Diff-Tuning on top of each tuning method (final FID, mean ± std over seeds; the difference is "
        "Diff-Tuning − plain per seed, mean and 95% t interval; negative is better):",
        "",
        "| tuning | trainable share | plain | Diff-Tuning | difference [95% CI] | seeds better | significant |",
        "|---|---|---|---|---|---|---|",
    ]
    for tuning, plain, dt in pairs:
        seeds = [s for s, r in runs.items() if plain in r and dt in r]
        if not seeds:
            continue
        a = [runs[s][plain]["fid"] for s in seeds]
        b = [runs[s][dt]["fid"] for s in seeds]
        diffs = [y - x for x, y in zip(a, b, strict=True)]
        mean, low, high = paired_ci(diffs)
        significant = "yes" if low > 0 or high < 0 else "no"
        lines.append(
            f"| {tuning} | {_share(runs, dt)} | {'{:.2f} ± {:.2f}'.format(*_mean_std(a))} | "
            f"{'{:.2f} ± {:.2f}'.format(*_mean_std(b))} | {mean:+.2f} [{low:+.2f}, {high:+.2f}] | "
            f"{sum(d < 0 for d in diffs)}/{len(diffs)} | {significant} |"
        )
    return lines + [""]


def _domain_guidance_table(methods: list[str], runs: dict[int, dict[str, Any]]) -> list[str]:
    """Final FID with the source model as the guidance branch against without, per method, paired by seed."""
    guided = [m for m in methods if all("fid_domain_guidance" in r.get(m, {}) for r in runs.values())]
    if not guided:
        return []
    lines = [
        "Domain guidance (the source model, unconditional, as the guidance branch; same scale), final FID:",
        "",
        "| method | without | with | with − without [95% CI] | seeds better | significant |",
        "|---|---|---|---|---|---|",
    ]
    for method in guided:
        without = [r[method]["fid"] for r in runs.values()]
        with_ = [r[method]["fid_domain_guidance"] for r in runs.values()]
        diffs = [b - a for a, b in zip(without, with_, strict=True)]
        lines.append(
            f"| {method} | {'{:.2f} ± {:.2f}'.format(*_mean_std(without))} | "
            f"{'{:.2f} ± {:.2f}'.format(*_mean_std(with_))} | {_paired_cell(diffs)} |"
        )
    return lines + [""]


def summarise(experiments: list[dict[str, Any]], out: Path) -> str:
    """Write ``summary.md`` (final-FID and convergence tables per experiment), ``summary.json`` and the plots."""
    lines = ["# Reproduction study: results", ""]
    by_name = {exp["name"]: exp for exp in experiments}
    for exp in experiments:
        lines += [
            f"## {exp['name']}",
            "",
            exp["description"],
            "",
            f"Seeds finished: {sorted(exp['runs'])}",
            "",
        ]
        if not exp["runs"]:
            continue
        methods, runs = _with_baseline(exp, by_name)
        curves = _convergence(methods, runs)
        lines += _fid_table(methods, runs) + [""] + _paired_table(methods, runs) + _tuning_table(exp)
        lines += _domain_guidance_table(methods, runs)
        lines += ["FID over fine-tuning steps (mean ± std over seeds):", ""]
        lines += _convergence_table(curves) + [""]
        plot = out / exp["name"] / "convergence.png"
        plot.parent.mkdir(parents=True, exist_ok=True)
        _plot_convergence(curves, exp["name"], plot)
        lines += [f"![convergence]({plot.relative_to(out).as_posix()})", ""]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(experiments, indent=2))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path, help="experiment configs (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reproduction", help="results folder")
    parser.add_argument("--cache-dir", type=Path, help="source-model cache (default ~/.cache/difftune)")
    parser.add_argument("--summarise-only", action="store_true", help="only rebuild the tables")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run only these of each config's seeds (e.g. to split over processes)",
    )
    args = parser.parse_args()
    every = sorted((ROOT / "configs" / "reproduction").glob("*.yaml"))
    if not args.summarise_only:
        for config in args.configs or every:
            run_experiment(config, args.out, args.cache_dir, args.seeds)
    # the summary always covers every experiment with finished runs, not only the ones just run
    every += [c for c in args.configs if c.resolve() not in {e.resolve() for e in every}]
    print(summarise([collect(c, args.out) for c in every], args.out))


if __name__ == "__main__":
    main()
