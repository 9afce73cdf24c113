"""Conditions for a text-conditional model from what a user types: prompts, and a ControlNet's control
image files (used as they are: already an edge map, a depth map, ...)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from difftune.backbones.conditioning import Conditioning
from difftune.backbones.controlnet import CONTROL, to_uint8
from difftune.backbones.loading import LoadedModel
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.errors import UserError
from difftune.images import load_square_image


def prompt_conditions(
    loaded: LoadedModel, prompts: Sequence[str], controls: Sequence[str] = ()
) -> Conditioning:
    """The condition bundle of ``prompts`` (and one control image file for all, or one per prompt).

    Raises:
        UserError: the model is not text-conditional, or a ControlNet gets no control image.
    """
    backbone = loaded.backbone
    if PROMPTS not in backbone.condition_names or loaded.prompts is None:
        raise UserError(
            "prompts need a text-conditional model (Stable Diffusion); this one takes class labels"
        )
    loaded.prompts.warn_truncated(prompts)
    tensors = {PROMPTS: loaded.prompts.encode(list(prompts))}
    if CONTROL in backbone.condition_names:
        if not controls:
            raise UserError("a ControlNet needs --control-image (one for all prompts, or one per prompt)")
        side = backbone.sample_shape[1] * backbone.control_downsample
        images = torch.stack([(load_square_image(path, side, 3) + 1) / 2 for path in controls])
        if images.shape[0] == 1:
            images = images.expand(len(prompts), -1, -1, -1)
        tensors[CONTROL] = to_uint8(images)
    return Conditioning(tensors)
