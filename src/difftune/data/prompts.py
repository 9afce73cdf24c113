"""Conditions for a text-conditional model from what a user types: prompts, and a ControlNet's control
image files (used as they are: already an edge map, a depth map, ...)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from difftune.backbones.conditioning import Conditioning
from difftune.backbones.controlnet import CONTROL, to_uint8
from difftune.backbones.loading import LoadedModel
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.errors import UserError
from difftune.io.images import load_square_image


def prompt_conditions(
    loaded: LoadedModel, prompts: Sequence[str], controls: Sequence[str] = ()
) -> Conditioning:
    """The condition bundle of ``prompts`` (and one control image file for all, or one per prompt).

    Raises:
        UserError: the model is not text-conditional, a ControlNet gets no control image, or a model
            without one gets control images (:func:`check_condition_flags`).
    """
    backbone = loaded.backbone
    check_condition_flags(backbone.condition_names, loaded.weights[0] or loaded.source, True, controls)
    assert loaded.prompts is not None  # load_pretrained gives every text-conditional model its encoder
    loaded.prompts.warn_truncated(prompts)
    tensors = {PROMPTS: loaded.prompts.encode(list(prompts))}
    if CONTROL in backbone.condition_names:
        side = backbone.sample_shape[1] * backbone.control_downsample
        images = torch.stack([(load_square_image(path, side, 3) + 1) / 2 for path in controls])
        if images.shape[0] == 1:
            images = images.expand(len(prompts), -1, -1, -1)
        tensors[CONTROL] = to_uint8(images)
    return Conditioning(tensors)


def check_condition_flags(
    condition_names: Collection[str], model: str, prompts: bool, controls: Sequence[str] = ()
) -> None:
    """Refuse sampling inputs that ``model`` (conditioned on ``condition_names``) cannot take: prompts
    for a class-conditional model, class labels for a text-conditional one, control images for a model
    without a ControlNet, and a ControlNet without them.

    Raises:
        UserError: the message names the mismatch and the flags to give instead.
    """
    if prompts and PROMPTS not in condition_names:
        raise UserError(
            f"{model} takes class labels, not prompts (it is not text-conditional); give --labels instead"
        )
    if not prompts and "labels" not in condition_names:
        raise UserError(
            f"{model} is not class-conditional: give --prompt (and --control-image for a ControlNet)"
        )
    if controls and CONTROL not in condition_names:
        raise UserError(
            f"{model} has no ControlNet, so --control-image would be ignored; leave it out, or give a "
            "ControlNet model (a ControlNet run's final/ or pipeline) as --model"
        )
    if prompts and CONTROL in condition_names and not controls:
        raise UserError("a ControlNet needs --control-image (one for all prompts, or one per prompt)")
