"""``difftune demo``: plain fine-tuning vs Diff-Tuning on handwritten digits, end to end on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo (or print its plan); return the exit code."""
    from difftune.demo import DemoSettings, run_demo

    settings = DemoSettings(
        out=Path(args.out), cache_dir=Path(args.cache_dir) if args.cache_dir else None, seed=args.seed
    )
    if args.dry_run:
        print(settings.describe())
        return 0
    run_demo(settings)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``difftune demo``."""
    p = subparsers.add_parser(
        "demo", help="the built-in demo: plain fine-tuning vs Diff-Tuning on handwritten digits"
    )
    p.add_argument("--out", default="demo_out", help="output folder (results.json, report.md, PNGs)")
    p.add_argument(
        "--cache-dir", help="where the pre-trained source model is cached (default ~/.cache/difftune)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the whole demo")
    p.add_argument("--dry-run", action="store_true", help="print the demo's plan, do nothing")
    p.set_defaults(func=cmd_demo)
