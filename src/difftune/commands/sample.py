"""``difftune sample``: images from a checkpoint or any class-conditional diffusers model, into a folder."""

from __future__ import annotations

import argparse
from typing import Any

from difftune.commands import add_model_args, check_scheduler
from difftune.config import check_model_path
from difftune.sampling_spec import add_sampling_args, sampling_spec_from_args


def cmd_sample(args: argparse.Namespace) -> int:
    """Check the flags and the model; write the images and a grid (or print the plan); return the exit code."""
    from difftune.sampling import parse_labels

    labels = parse_labels(args.labels)
    if args.per_label < 1:
        raise ValueError(f"--per-label must be >= 1, got {args.per_label}")
    spec = sampling_spec_from_args(args)
    check_scheduler(spec.scheduler)
    check_model_path(args.model)
    if args.dry_run:
        total = len(labels) * args.per_label
        from difftune.backbones.loading import inference_subfolder

        subfolder = inference_subfolder(args.model, args.subfolder, not args.no_ema)
        print(
            f"would sample {total} images (labels {labels} x {args.per_label}) from {args.model}"
            f"{' [' + subfolder + ']' if subfolder else ''} "
            f"with {spec.describe()}, seeds {spec.seed}..{spec.seed + total - 1} into {args.out}"
        )
        return 0
    from difftune.backbones import load_trained
    from difftune.sampling import sample_to_folder

    loaded = load_trained(args.model, args.subfolder, not args.no_ema, args.vae)
    labels = parse_labels(args.labels, loaded.backbone.num_classes)
    path = sample_to_folder(
        loaded, labels, args.per_label, args.out, spec.scheduler, spec.steps, spec.guidance_scale, spec.seed,
        args.batch_size,
    )
    print(f"wrote {len(labels) * args.per_label} images and {path}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``difftune sample``."""
    p = subparsers.add_parser("sample", help="generate images from a checkpoint or any class-conditional diffusers model")
    p.add_argument("--model", required=True, help="checkpoint / final directory, pipeline directory or hub id")
    add_model_args(p)
    p.add_argument("--labels", default="0", help="comma-separated class labels, e.g. 0,1,2")
    p.add_argument("--per-label", type=int, default=8, help="images per label")
    add_sampling_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (does not change results)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan, do nothing")
    p.set_defaults(func=cmd_sample)
