"""``difftune demo [digits|photos|controlnet|captions]``: the built-in demos, end to end on a CPU.

``digits`` (the default): plain fine-tuning vs Diff-Tuning on handwritten digits, by FID.
``photos``: the same transfer from a source model pre-trained on patches of bundled photographs (the
second test bed; its pre-training took about 25 minutes on one CPU thread, once, then it is cached).
``controlnet``: a ControlNet on digit edge maps, plain vs Diff-Tuning vs inverse-SNR weighting, by how
soon generated digits follow their edges.
``captions``: a text-to-image model (rectified flow) fine-tuned DreamBooth-style on "sks digit k", plain vs
Diff-Tuning with a caption bank vs with a ``class_swap`` bank vs prior preservation, by target FID and
forgetting.
``--process flow|edm``: the digits or photos demo with a rectified-flow DiT or an EDM-preconditioned UNet
as the source model (pre-trained by difftune and cached like the DDPM one).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from difftune.commands import start_torch
from difftune.errors import UserError

FIXED_PROCESS = {"controlnet": "a DDPM UNet", "captions": "a rectified-flow text-to-image UNet"}


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the chosen demo (or print its plan); return the exit code."""
    if args.which in FIXED_PROCESS and args.process != "ddpm":
        raise UserError(
            f"the {args.which} demo's model is fixed ({FIXED_PROCESS[args.which]}); --process {args.process} is "
            "for digits or photos"
        )
    if args.which == "controlnet":
        from difftune.demos.controlnet import ControlDemoSettings as Settings
        from difftune.demos.controlnet import run_control_demo as run

        default_out, preset = "demo_controlnet_out", {}
    elif args.which == "captions":
        from difftune.demos.caption_bed import CaptionBedSettings as Settings  # type: ignore[assignment]
        from difftune.demos.caption_bed import run_caption_bed as run  # type: ignore[assignment]

        default_out, preset = "demo_captions_out", {}
    else:
        from difftune.demos.digits import run_demo as run
        from difftune.demos.settings import PHOTO_TEST_BED
        from difftune.demos.settings import DemoSettings as Settings

        base = "demo_photos" if args.which == "photos" else "demo"
        default_out = f"{base}_out" if args.process == "ddpm" else f"{base}_{args.process}_out"
        preset = {**(PHOTO_TEST_BED if args.which == "photos" else {}), "process": args.process}
    settings = Settings(
        **preset,
        out=Path(args.out or default_out),
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        seed=args.seed,
    )
    if args.dry_run:
        print(settings.describe())
        return 0
    start_torch()
    run(settings)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``difftune demo``."""
    p = subparsers.add_parser(
        "demo",
        help="the built-in demos: Diff-Tuning on handwritten digits from a digits source (digits) or a "
        "photo-patch source (photos), a ControlNet (controlnet), or a text-to-image model's caption bank (captions)",
    )
    p.add_argument(
        "which",
        nargs="?",
        default="digits",
        choices=["digits", "photos", "controlnet", "captions"],
        help="digits: plain vs Diff-Tuning by FID (default); photos: the same from a source model pre-trained "
        "on photo patches; controlnet: ControlNet convergence on digit edges; captions: a text-to-image model "
        "taught 'sks digit k', with caption and class_swap banks, by target FID and forgetting",
    )
    p.add_argument(
        "--out",
        help="output folder (results.json, PNGs); default demo_out, demo_photos_out, demo_controlnet_out or "
        "demo_captions_out",
    )
    p.add_argument(
        "--cache-dir", help="where the pre-trained source model is cached (default ~/.cache/difftune)"
    )
    p.add_argument(
        "--process",
        choices=["ddpm", "flow", "edm"],
        default="ddpm",
        help="the source model's forward process (digits and photos): ddpm (a DiT, the default), flow (a "
        "rectified-flow DiT, SiT-style) or edm (an EDM-preconditioned UNet); output default demo_<process>_out",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the whole demo")
    p.add_argument("--dry-run", action="store_true", help="print the demo's plan, do nothing")
    p.set_defaults(func=cmd_demo)
