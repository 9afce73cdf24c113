"""``difftune continual``: fine-tune on a sequence of tasks, each stage from the previous stage's model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from difftune.commands import add_config_args, start_torch
from difftune.config.checks import ConfigError, check_model_paths

HELP = "fine-tune on a sequence of tasks (tasks: in the config), measuring forgetting after every stage"


def cmd_continual(args: argparse.Namespace) -> int:
    """Check the sequence config; run its stages (or print the plan); return the exit code."""
    if not args.config:
        raise ConfigError("difftune continual needs --config: a config with a tasks: list")
    from difftune.continual.plan import load_sequence

    plan = load_sequence(args.config, args.overrides)
    check_model_paths(plan.base.model)
    for k, task in enumerate(plan.tasks, start=1):
        data = plan.task_data(k)
        if data.source in ("folder", "captions", "hf_dataset") and not Path(data.path or "").is_dir():
            raise FileNotFoundError(
                f"task {task.name}: data.path {data.path!r} is not a directory; point tasks[{k}].data.path "
                "at the task's images"
            )
    from difftune.continual.runner import describe

    if args.dry_run:
        print("\n".join(describe(plan)))
        return 0
    start_torch()
    from difftune.continual.runner import run_sequence

    out = run_sequence(plan, overwrite=args.overwrite)
    measured = "measures.json, heatmap.png; " if plan.spec.features else ""
    print(f"sequence: {out} ({measured}`difftune report {out}`)")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``difftune continual``."""
    parser = subparsers.add_parser("continual", help=HELP)
    add_config_args(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a sequence with other settings in train.output_dir"
    )
    parser.set_defaults(func=cmd_continual)
