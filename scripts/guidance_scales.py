"""Classifier-free guidance vs domain guidance over guidance scales, on finished demo runs.

    python scripts/guidance_scales.py docs/reproduction/digits_domain_guidance --seeds 0 1 2 3 4 \
        --scales 1.0 1.5 2.0 3.0 --out docs/reproduction/digits_domain_guidance/scales.md

For each seed folder (a ``difftune demo`` output whose ``runs/<method>/final`` still exist), rebuilds
the demo's evaluator from the seed's ``run_info.json`` settings, and scores each method's final
model at each scale with its own unconditional branch (classifier-free guidance) and with the
source model as the guidance branch (domain guidance). Same seeds and sampler as the demo's FID.
Writes a markdown table (FID mean ± std over seeds per method, guidance and scale) and, with
``--json``, every seed's FID (``method -> guidance -> scale -> seed -> FID``, added to what the file
already holds, so scales can be scored in several runs), which ``scripts/study_grid.py`` pairs by
seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from difftune.backbones import load_pretrained, load_trained
from difftune.demos.digits import DemoSettings, pretrain_source
from difftune.demos.evaluation import DigitsEvaluator
from difftune.io.atomic import atomic_write_json, atomic_write_text


def _settings(seed_dir: Path) -> DemoSettings:
    saved = json.loads((seed_dir / "run_info.json").read_text())["settings"]
    known = {f.name for f in fields(DemoSettings)}
    values = {k: v for k, v in saved.items() if k in known and k not in ("out", "cache_dir")}
    return DemoSettings(out=seed_dir, **values)


def merge_fids(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with every FID of ``new`` added (``method -> guidance -> scale -> seed``); ``new`` wins."""
    merged = copy.deepcopy(old)
    for method, kinds in new.items():
        for kind, scales in kinds.items():
            for scale, seeds in scales.items():
                merged.setdefault(method, {}).setdefault(kind, {}).setdefault(scale, {}).update(seeds)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="folder with seed<k>/ demo outputs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument(
        "--guidance",
        nargs="+",
        choices=["classifier-free", "domain"],
        default=["classifier-free", "domain"],
        help="which guidance to score (default both)",
    )
    parser.add_argument("--out", type=Path, help="markdown table to write (default: print only)")
    parser.add_argument("--json", type=Path, help="per-seed FIDs to write (JSON)")
    args = parser.parse_args()
    fids: dict[tuple[str, str, float], list[float]] = {}
    per_seed: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for seed in args.seeds:
        settings = _settings(args.experiment / f"seed{seed}")
        source = load_pretrained(
            str(pretrain_source(settings)), subfolder=f"ema/{settings.model_folder}"
        ).backbone
        evaluator = DigitsEvaluator.build(settings)
        for method in settings.methods:
            final = load_trained(str(settings.out / "runs" / method / "final"))
            for scale in args.scales:
                evaluator.settings = replace(settings, guidance_scale=scale)
                for kind, guide in (("classifier-free", None), ("domain", source)):
                    if kind not in args.guidance or (kind == "domain" and scale == 1.0):
                        continue  # at scale 1 both are the fine-tuned model alone
                    fid = evaluator.fid(evaluator.samples(final, guide=guide))
                    fids.setdefault((method, kind, scale), []).append(fid)
                    per_seed.setdefault(method, {}).setdefault(kind, {}).setdefault(f"{scale:g}", {})[
                        str(seed)
                    ] = fid
                    print(f"seed {seed} {method} {kind} {scale:g}: {fid:.2f}", flush=True)
    lines = ["| method | guidance | " + " | ".join(f"scale {s:g}" for s in args.scales) + " |"]
    lines.append("|---|---|" + "---|" * len(args.scales))
    for method in dict.fromkeys(m for m, _, _ in fids):
        for kind in ("classifier-free", "domain"):
            cells = []
            for scale in args.scales:
                values = fids.get((method, kind, scale))
                cells.append(
                    f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"
                    if values
                    else "–"
                )
            lines.append(f"| {method} | {kind} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        atomic_write_text(args.out, f"Seeds {args.seeds}; final FID, mean ± std over seeds.\n\n{table}")
    if args.json:
        atomic_write_json(
            args.json, merge_fids(json.loads(args.json.read_text()) if args.json.is_file() else {}, per_seed)
        )


if __name__ == "__main__":
    main()
