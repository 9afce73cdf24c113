"""Command-line interface: ``difftune {train,bank,sample,demo,eval,forgetting}``.

Every subcommand takes ``--dry-run``: it validates its inputs, prints what it would do, and exits.
Errors a user can fix (:data:`USER_ERRORS`) are printed as one line (``difftune: error: ...``) with exit
code 2, or as a full traceback with ``-v``. Any other exception is a bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from difftune.config import ConfigError, ExperimentConfig, check_model_path, load_config
from difftune.errors import UserError

# bad input: UserError, and the built-in types the library raises for bad values and missing paths
USER_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML experiment config (sections: model, data, bank, objective, train)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set train.max_steps=100",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan, do nothing")


def _plan(cfg: ExperimentConfig) -> str:
    oc, tc = cfg.objective, cfg.train
    lines = [
        f"model      {cfg.model.pretrained}",
        f"batch      {tc.batch_size} = {tc.batch_size - cfg.bank_count} target + {cfg.bank_count} bank "
        f"(x{tc.gradient_accumulation} accumulation)",
        f"schedules  target {oc.target_schedule}(s={oc.target_exponent:g}), bank {oc.bank_schedule}(s={oc.bank_exponent:g}), "
        f"realisation {oc.realisation}",
        f"loss       mean(target) + {oc.bank_weight:g} * mean(bank); cfg dropout {oc.cfg_dropout:g}",
        f"steps      {tc.max_steps}, lr {tc.learning_rate:g}, EMA {tc.ema_decay:g}, precision {tc.mixed_precision}",
        f"output     {tc.output_dir}",
    ]
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_model_path(cfg.model.pretrained)
    if cfg.data.source == "folder" and not Path(cfg.data.path or "").is_dir():
        raise FileNotFoundError(f"data.path {cfg.data.path!r} is not a directory")
    if cfg.bank_count and not (Path(cfg.bank.path) / "manifest.json").is_file():
        raise FileNotFoundError(
            f"bank {cfg.bank.path!r} does not exist: run `difftune bank` with this config first, "
            "or set objective.bank_share=0 for plain fine-tuning"
        )
    if args.dry_run:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        print(_plan(cfg))
        return 0
    from difftune.trainer import train_model

    final = train_model(cfg)
    print(f"final model: {final}")
    return 0


def cmd_bank(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_model_path(cfg.model.pretrained)
    if not cfg.bank.path:
        raise ConfigError("bank.path is empty: set it to the directory the bank should be written to")
    from difftune.sampling import scheduler_names

    if cfg.bank.scheduler not in scheduler_names():
        raise ConfigError(f"bank.scheduler={cfg.bank.scheduler!r} is unknown; valid: {', '.join(scheduler_names())}")
    if args.dry_run:
        b = cfg.bank
        print(
            f"would generate {b.num_samples} samples from {cfg.model.pretrained} into {b.path} "
            f"({-(-b.num_samples // b.shard_size)} shards; {b.scheduler}, {b.num_inference_steps} steps, "
            f"guidance {b.guidance_scale:g}, seeds {b.seed}..{b.seed + b.num_samples - 1})"
        )
        return 0
    from difftune.backbones import load_pretrained
    from difftune.bank import generate_bank

    loaded = load_pretrained(cfg.model.pretrained, cfg.model.subfolder, cfg.model.vae, cfg.model.revision)
    store = generate_bank(loaded, cfg.bank)
    print(f"bank complete: {store.root} ({cfg.bank.num_samples} samples)")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from difftune.sampling import parse_labels, scheduler_names

    labels = parse_labels(args.labels)
    if args.per_label < 1 or args.steps < 1:
        raise ValueError("--per-label and --steps must be >= 1")
    if args.scheduler not in scheduler_names():
        raise ValueError(f"--scheduler {args.scheduler!r} is unknown; valid: {', '.join(scheduler_names())}")
    check_model_path(args.model)
    if args.dry_run:
        total = len(labels) * args.per_label
        from difftune.backbones.loading import inference_subfolder

        subfolder = inference_subfolder(args.model, args.subfolder, not args.no_ema)
        print(
            f"would sample {total} images (labels {labels} x {args.per_label}) from {args.model}"
            f"{' [' + subfolder + ']' if subfolder else ''} "
            f"with {args.scheduler}, {args.steps} steps, guidance {args.guidance_scale:g}, "
            f"seeds {args.seed}..{args.seed + total - 1} into {args.out}"
        )
        return 0
    from difftune.backbones import load_trained
    from difftune.sampling import sample_to_folder

    loaded = load_trained(args.model, args.subfolder, not args.no_ema, args.vae)
    labels = parse_labels(args.labels, loaded.backbone.num_classes)
    path = sample_to_folder(
        loaded, labels, args.per_label, args.out, args.scheduler, args.steps, args.guidance_scale, args.seed,
        args.batch_size,
    )
    print(f"wrote {len(labels) * args.per_label} images and {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from difftune.demo import DemoSettings, run_demo

    settings = DemoSettings(out=Path(args.out), cache_dir=Path(args.cache_dir) if args.cache_dir else None, seed=args.seed)
    if args.dry_run:
        print(settings.describe())
        return 0
    run_demo(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``difftune`` argument parser."""
    parser = argparse.ArgumentParser(prog="difftune", description="Diff-Tuning for diffusion models (NeurIPS 2024).")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="verbose logging, and a full traceback on errors"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a pre-trained model with Diff-Tuning (or plain fine-tuning)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bank", help="generate (or resume) the knowledge bank from the frozen pre-trained model")
    _add_config_args(p)
    p.set_defaults(func=cmd_bank)

    p = sub.add_parser("sample", help="generate images from a checkpoint or any class-conditional diffusers model")
    p.add_argument("--model", required=True, help="checkpoint / final directory, pipeline directory or hub id")
    p.add_argument("--subfolder", help="model sub-folder (default: EMA weights if present, else transformer/unet)")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights, not the EMA weights")
    p.add_argument("--vae", help="VAE hub id or directory for latent models (default: the model's own)")
    p.add_argument("--labels", default="0", help="comma-separated class labels, e.g. 0,1,2")
    p.add_argument("--per-label", type=int, default=8, help="images per label")
    p.add_argument("--scheduler", default="DPMSolverMultistepScheduler", help="diffusers scheduler class name")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--guidance-scale", type=float, default=1.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (does not change results)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan, do nothing")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="the built-in demo: plain fine-tuning vs Diff-Tuning on handwritten digits")
    p.add_argument("--out", default="demo_out", help="output folder (results.json, report.md, PNGs)")
    p.add_argument("--cache-dir", help="where the pre-trained source model is cached (default ~/.cache/difftune)")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole demo")
    p.add_argument("--dry-run", action="store_true", help="print the demo's plan, do nothing")
    p.set_defaults(func=cmd_demo)

    from difftune.analysis.forgetting_cli import add_forgetting_parser
    from difftune.evaluation import add_eval_parser

    add_eval_parser(sub)
    add_forgetting_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``difftune`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    torch.set_float32_matmul_precision("high")
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if args.verbose:
            traceback.print_exc()
            return 2
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"difftune: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difftune: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
