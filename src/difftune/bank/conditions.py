"""What a text-conditional model's knowledge bank is generated from: its prompts, and for a ControlNet
the annotator that turns each generated image into its control image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.controlnet import CONTROL, ControlNetBackbone
from difftune.backbones.loading import LoadedModel
from difftune.backbones.stable_diffusion import TextConditionalBackbone
from difftune.config.experiment import ExperimentConfig
from difftune.errors import UserError


def bank_prompts(cfg: ExperimentConfig) -> list[str]:
    """``bank.prompts`` (a text file, one prompt per line) or, when unset, the target set's captions.

    Raises:
        UserError: the prompt file is missing or empty.
    """
    if cfg.bank.prompts:
        path = Path(cfg.bank.prompts)
        if not path.is_file():
            raise UserError(
                f"bank.prompts {str(path)!r} does not exist; give a text file with one prompt per line"
            )
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"bank.prompts {str(path)!r} holds no prompts; write one prompt per line")
        return prompts
    from difftune.data.targets import load_target_images

    images = load_target_images(cfg.data, 8, 3)  # captions only: nothing is decoded at this size
    return images.caption_list(cfg.data.caption_template)


def prepare_bank_conditions(loaded: LoadedModel, cfg: ExperimentConfig) -> None:
    """Give a text-conditional backbone its bank prompts (embedded) and a ControlNet its annotator."""
    backbone = loaded.backbone
    if not isinstance(backbone, TextConditionalBackbone):
        return
    assert loaded.prompts is not None
    prompts = bank_prompts(cfg)
    loaded.prompts.warn_truncated(prompts, "bank prompts")
    backbone.set_bank_prompts(prompts, loaded.prompts.encode(prompts))
    if isinstance(backbone, ControlNetBackbone):
        if not cfg.data.annotator:  # also refused by `difftune bank` before loading anything
            raise UserError(
                "a ControlNet bank computes its control images from its samples: set data.annotator (e.g. canny)"
            )
        from difftune.control import build_annotator

        backbone.annotator = build_annotator(cfg.data.annotator)


def check_bank_conditions(
    manifest: dict[str, Any], backbone: Backbone, annotator: str | None, path: str
) -> None:
    """Refuse a bank that lacks a condition the model needs, or whose control images another annotator made.

    ``annotator`` is the target data's (``data.annotator``); ``None`` means precomputed controls, which no
    bank matches. Banks of class-conditional models record no condition names: they hold labels.

    Raises:
        UserError: the message names what the bank holds and how to make a matching one.
    """
    held = manifest.get("conditions", ["labels"])
    missing = [name for name in backbone.condition_names if name not in held]
    if missing:
        raise UserError(
            f"bank {path} holds {held} but the model needs {list(backbone.condition_names)}; regenerate the "
            "bank with this config (difftune bank)"
        )
    if CONTROL in backbone.condition_names:
        from difftune.control import build_annotator

        wanted = build_annotator(annotator).record() if annotator else None
        if manifest.get("annotator") != wanted or wanted is None:
            raise UserError(
                f"bank {path} holds control images made by {manifest.get('annotator')}, the target's come from "
                f"{wanted or 'the data (data.control_column)'}; a ControlNet bank must use the target's annotator: "
                "set data.annotator and regenerate the bank, or set objective.retention_data=target"
            )


def training_bank(cfg: ExperimentConfig, loaded: LoadedModel) -> tuple[torch.Tensor, Conditioning]:
    """The bank a run replays: its samples (N, C, H, W) and their conditions, checked against the model
    (shape, space, weights, conditions) before the target set is encoded; empty without a bank.

    Raises:
        UserError: the bank is missing, incomplete, damaged or does not match the model.
    """
    from difftune.bank.generate import load_bank
    from difftune.io.store import LatentStore

    bank = {"samples": torch.empty(0)}
    if cfg.uses_bank:
        bank = load_bank(cfg.bank.path, loaded)
        manifest = LatentStore(cfg.bank.path).manifest
        check_bank_conditions(manifest, loaded.backbone, cfg.data.annotator, cfg.bank.path)
    names = [name for name in loaded.backbone.condition_names if name in bank]
    return bank["samples"], Conditioning({name: bank[name] for name in names}, bank["samples"].shape[0])
