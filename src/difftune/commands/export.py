"""``difftune export``: an adapter run's weights as a shareable adapter, or merged into a stock model.

    difftune export runs/x/final --out exported/x-lora            # the adapter alone (EMA weights)
    difftune export runs/x/final --out exported/x-full --merge    # a full diffusers model directory

``--merge`` bakes the adapter into the base model's weights; the result loads with the stock
``from_pretrained`` of its class (and, for a latent DiT, as a ``DiTPipeline``), with no trace of
difftune or peft. AdaptFormer and VPT add modules a stock model has no place for: they export
only as adapters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from difftune.commands import start_torch
from difftune.errors import UserError


def cmd_export(args: argparse.Namespace) -> int:
    source, out = Path(args.model), Path(args.out)
    if not source.is_dir():
        raise UserError(f"{source} is not a directory; give a run's final/ (or a checkpoint's model/)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder to write the export to")
    from difftune.backbones.adapters import ADAPTER, adapter_directory, load_adapter, merged_model
    from difftune.backbones.model_card import CARD, stock_loader
    from difftune.backbones.saving import save_model, save_pipeline_index
    from difftune.io.atomic import atomic_directory

    weights = adapter_directory(source, use_ema=not args.no_ema)
    if weights is None:
        raise UserError(
            f"{source} holds no adapter (no {ADAPTER}/difftune_tuning.json); export is for runs with a "
            "parameter-efficient tuning.method (a full fine-tuning final/ already is a diffusers model)"
        )
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--out {out} is not empty; choose another folder or pass --overwrite")
    if args.dry_run:
        print(
            f"would export {weights} {'merged into its base model' if args.merge else 'as an adapter'} to {out}"
        )
        return 0
    if not args.merge:
        with atomic_directory(out) as staging:
            shutil.copytree(weights, staging, dirs_exist_ok=True)
        print(f"wrote the adapter of {source} to {out}")
        return 0
    start_torch()
    loaded = load_adapter(weights)
    # the merged model replaces the tuned one inside the loaded backbone, which keeps what else it
    # holds (a ControlNet's frozen UNet, the empty prompt): an adapter's constructor may need them
    backbone = loaded.backbone
    backbone.inner = merged_model(backbone.inner)
    plain = dataclasses.replace(loaded, tuning=None)
    save_model(plain, out)
    names_file = source / "class_names.json"
    if names_file.is_file():
        save_pipeline_index(plain, out, json.loads(names_file.read_text()))
    print(
        f"wrote {type(backbone.inner).__name__} with the adapter of {source} merged in to {out}; load it with "
        f"{stock_loader(plain, out)} ({out / CARD} says more)"
    )
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``difftune export``."""
    p = subparsers.add_parser("export", help="export an adapter run: the adapter alone, or merged (--merge)")
    p.add_argument("model", help="a run's final/ (or a checkpoint's model/) that holds adapter/")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--merge", action="store_true", help="bake the adapter into a full diffusers model")
    p.add_argument("--no-ema", action="store_true", help="the trained weights instead of their EMA")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan, do nothing")
    p.set_defaults(func=cmd_export)
