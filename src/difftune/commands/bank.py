"""``difftune bank``: generate (or resume) the knowledge bank from the frozen pre-trained model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from difftune.commands import add_config_command, check_scheduler, start_torch
from difftune.config.checks import ConfigError, check_model_paths
from difftune.config.experiment import ExperimentConfig, load_config

HELP = "generate (or resume) the knowledge bank from the frozen pre-trained model"


def cmd_bank(args: argparse.Namespace) -> int:
    """Check the config and the model; generate the bank (or print the plan); return the exit code."""
    cfg = load_config(args.config, args.overrides)
    check_model_paths(cfg.model)
    if not cfg.bank.path:
        raise ConfigError("bank.path is empty: set it to the directory the bank should be written to")
    if cfg.model.controlnet and not cfg.data.annotator:
        raise ConfigError(
            "a ControlNet bank computes its control images from its samples: set data.annotator (e.g. canny)"
        )
    check_scheduler(
        cfg.bank.sampling.scheduler, "bank.sampling.scheduler", ConfigError
    )  # imports diffusers: the last check
    if args.dry_run:
        b, spec = cfg.bank, cfg.bank.sampling
        line = _planned_prompts(cfg)
        print(
            f"would generate {b.num_samples} samples from {cfg.model.pretrained} into {b.path} "
            f"({-(-b.num_samples // b.shard_size)} shards; {spec.describe()}, "
            f"seeds {spec.seed}..{spec.seed + b.num_samples - 1})"
        )
        if line:
            print(f"prompts: {line}")
        if cfg.data.buckets.enabled:
            print(f"buckets: {_planned_buckets(cfg)}")
        if cfg.stores_teacher:
            k = cfg.objective.distillation.stored_draws
            print(
                f"teacher: {k} stored draws (t ~ {cfg.objective.bank_schedule}, noise) and predictions per sample"
            )
        return 0
    start_torch()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from difftune.backbones import load_pretrained
    from difftune.bank import generate_bank
    from difftune.bank.conditions import prepare_bank_conditions

    m = cfg.model
    started = time.perf_counter()
    loaded = load_pretrained(m.pretrained, m.subfolder, m.vae, m.revision, m.controlnet, guidance=m.guidance)
    line = prepare_bank_conditions(loaded, cfg)
    if line:
        print(f"prompts: {line}")
    if cfg.data.buckets.enabled:
        from difftune.bank.buckets import generate_bucket_bank

        plan = generate_bucket_bank(loaded, cfg)
        print(f"bank complete: {cfg.bank.path} ({cfg.bank.num_samples} samples in the buckets {plan.line()})")
        return 0
    from difftune.bank.teacher_draws import teacher_draws

    loading = time.perf_counter() - started
    # processes reach this point apart (each imports and loads at its own pace): the generation is
    # timed from a common start, so that it is what the processes divide
    PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).wait_for_everyone()
    generating = time.perf_counter()
    store = generate_bank(loaded, cfg.bank, teacher=teacher_draws(cfg, loaded))
    seconds = time.perf_counter() - generating
    print(
        f"bank complete: {store.root} ({cfg.bank.num_samples} samples; model and conditions ready in "
        f"{loading:.1f} s, generated in {seconds:.1f} s)"
    )
    return 0


def _planned_buckets(cfg: ExperimentConfig) -> str:
    """The dry run's line on the target's buckets and the bank samples each would get."""
    from difftune.data.buckets import bank_shares
    from difftune.data.targets import planned_buckets

    plan = planned_buckets(cfg.data)
    shares = bank_shares(plan.counts, cfg.bank.num_samples)
    each = ", ".join(f"{b.name} ({n})" for b, n in zip(plan.buckets, shares, strict=True))
    return f"{plan.line()}; bank samples {each}"


def _planned_prompts(cfg: ExperimentConfig) -> str | None:
    """The dry run's line on a ``bank.prompts`` other than the default ``captions``, whose prompts are read
    now; such a mode is refused for a model whose config says its bank takes no prompts (a hub model not
    in the local cache is checked once it is loaded)."""
    if cfg.bank.prompts == "captions":
        return None
    from difftune.backbones.loading import peek_backbone
    from difftune.bank.prompts import check_prompt_mode, choose_prompts

    try:
        backbone = peek_backbone(
            cfg.model.pretrained,
            cfg.model.subfolder,
            cfg.model.revision,
            local_only=not Path(cfg.model.pretrained).exists(),
            controlnet=cfg.model.controlnet,
        )
    except OSError:
        backbone = None
    if backbone is not None:
        check_prompt_mode(cfg.bank, backbone, cfg.model.pretrained)
    return choose_prompts(cfg).line


def add_parser(subparsers: Any) -> None:
    """Register ``difftune bank``."""
    add_config_command(subparsers, "bank", HELP, cmd_bank)
