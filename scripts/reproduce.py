"""Run the reproduction study: every experiment config in configs/reproduction/, each over its seeds.

    python scripts/reproduce.py                       # all experiments
    python scripts/reproduce.py configs/reproduction/digits_main.yaml
    python scripts/reproduce.py --summarise-only      # rebuild the tables from finished runs

An experiment config holds ``settings`` (fields of :class:`difftune.demo.DemoSettings`), ``methods``
(method name -> objective overrides) and ``seeds``. Runs go to ``<out>/<experiment>/seed<k>``;
a finished run (its results.json exists) is not run again. ``<out>/summary.md`` gets one table per
experiment: FID mean and standard deviation over seeds per method and the change relative to plain
fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from difftune.demo import DemoSettings, run_demo

ROOT = Path(__file__).resolve().parents[1]


def run_experiment(config: Path, out: Path, cache: Path | None, summarise_only: bool) -> dict[str, Any]:
    spec = yaml.safe_load(config.read_text())
    name = config.stem
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in spec["seeds"]:
        run_dir = out / name / f"seed{seed}"
        done = run_dir / "results.json"
        if not done.is_file() and not summarise_only:
            settings = DemoSettings(out=run_dir, cache_dir=cache, seed=seed, methods=spec["methods"], **spec.get("settings", {}))
            run_demo(settings)
        if done.is_file():
            per_seed[seed] = json.loads(done.read_text())
    return {
        "name": name,
        "description": spec.get("description", ""),
        "runs": per_seed,
        "methods": list(spec["methods"]),
        "baseline_from": spec.get("baseline_from"),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(experiments: list[dict[str, Any]], out: Path) -> str:
    lines = ["# Reproduction study: results", ""]
    by_name = {exp["name"]: exp for exp in experiments}
    for exp in experiments:
        runs = exp["runs"]
        lines += [f"## {exp['name']}", "", exp["description"], "", f"Seeds finished: {sorted(runs)}", ""]
        if not runs:
            continue
        lines += ["| method | FID mean ± std | per seed | vs plain |", "|---|---|---|---|"]
        # the plain baseline: this experiment's, or that of the experiment named by baseline_from
        base = runs if any("plain" in r for r in runs.values()) else by_name.get(exp["baseline_from"], {}).get("runs", {})
        plain = [r["plain"]["fid"] for r in base.values() if "plain" in r]
        for method in exp["methods"]:
            fids = [r[method]["fid"] for r in runs.values() if method in r]
            mean, std = _mean_std(fids)
            rel = f"{100 * (mean - statistics.fmean(plain)) / statistics.fmean(plain):+.1f}%" if plain else "n/a"
            lines.append(f"| {method} | {mean:.2f} ± {std:.2f} | {', '.join(f'{f:.2f}' for f in fids)} | {rel} |")
        lines.append("")
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
    args = parser.parse_args()
    configs = args.configs or sorted((ROOT / "configs" / "reproduction").glob("*.yaml"))
    experiments = [run_experiment(c, args.out, args.cache_dir, args.summarise_only) for c in configs]
    print(summarise(experiments, args.out))


if __name__ == "__main__":
    main()
