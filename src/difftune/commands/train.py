"""``difftune train``: fine-tune a pre-trained model with Diff-Tuning (or plain fine-tuning)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from difftune.commands import add_config_command, check_scheduler, start_torch
from difftune.config.checks import ConfigError, check_model_paths
from difftune.config.experiment import ExperimentConfig, load_config
from difftune.config.train import default_steps_note


def _schedule(name: str, exponent: float) -> str:
    """A schedule as the plan names it: the exponent only where it means something (power schedules)."""
    return f"{name}(s={exponent:g})" if name.startswith("power_") else name


def _plan(cfg: ExperimentConfig) -> str:
    oc, tc = cfg.objective, cfg.train
    lines = [
        f"model      {cfg.model.pretrained}, {cfg.tuning.method} tuning",
        f"batch      {tc.batch_size} = {tc.batch_size - cfg.bank_count} target + {cfg.bank_count} "
        f"{'bank' if cfg.uses_bank or not cfg.bank_count else 'retention (target data)'} "
        f"(x{tc.gradient_accumulation} accumulation)",
        f"schedules  target {_schedule(oc.target_schedule, oc.exponent(oc.target_schedule))}, "
        f"bank {_schedule(oc.bank_schedule, oc.exponent(oc.bank_schedule))}, realisation {oc.realisation}",
        f"loss       {oc.kind}: mean(target) + {oc.bank_weight:g} * mean("
        f"{'distance to the pre-trained model' if oc.kind == 'distillation' else 'bank'}); "
        f"cfg dropout {oc.cfg_dropout:g}",
        f"steps      {tc.max_steps}, lr {tc.learning_rate:g}, EMA {tc.ema_decay:g}, precision {tc.mixed_precision}",
        f"output     {tc.output_dir}",
    ]
    if cfg.default_steps:
        lines.insert(-1, f"note       {default_steps_note(tc.max_steps)}")
    return "\n".join(lines)


HELP = "fine-tune a pre-trained model with Diff-Tuning (or plain fine-tuning)"


def cmd_train(args: argparse.Namespace) -> int:
    """Check the config, the model, the data and the bank; train (or print the plan); return the exit code."""
    cfg = load_config(args.config, args.overrides)
    check_model_paths(cfg.model)
    if cfg.data.source == "folder" and not Path(cfg.data.path or "").is_dir():
        raise FileNotFoundError(
            f"data.path {cfg.data.path!r} is not a directory; point data.path at an image folder "
            "(one sub-directory per class)"
        )
    index = "buckets.json" if cfg.data.buckets.enabled else "manifest.json"  # a bank per bucket: their list
    if cfg.uses_bank and not (Path(cfg.bank.path) / index).is_file():
        raise FileNotFoundError(
            f"bank {cfg.bank.path!r} does not exist: run `difftune bank` with this config first, "
            "or set objective.bank_share=0 for plain fine-tuning"
        )
    if cfg.train.sample_every:  # found now, not at the first grid, hours into a run
        check_scheduler(cfg.train.sampling.scheduler, "train.sampling.scheduler", ConfigError)
    if args.dry_run:
        from difftune.training.preflight import preflight

        checks = preflight(cfg)  # the model's config, classes, bank and output; no weights, no encoding
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        print(_plan(cfg))
        print("\n".join(checks))
        return 0
    start_torch()
    from difftune.training.loop import train_model

    final = train_model(cfg)
    print(f"final model: {final}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``difftune train``."""
    add_config_command(subparsers, "train", HELP, cmd_train)
