"""Adapter for a ControlNet beside a frozen Stable Diffusion XL UNet.

The condition is SDXL's (:mod:`~difftune.backbones.sdxl`: prompt embeddings, pooled embeddings and the
size ids ``time_ids``) and the control image (:mod:`~difftune.backbones.controlnet`): the ControlNet and
the UNet both read the pooled embeddings and size ids as ``added_cond_kwargs``, as
``StableDiffusionXLControlNetPipeline`` feeds them. The guidance drop is SDXL's, keeping the control image.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.controlnet import CONTROL, ControlNetBackbone
from difftune.backbones.sdxl import POOLED, TIME_IDS, SDXLBackbone
from difftune.backbones.stable_diffusion import PROMPTS


class SDXLControlNetBackbone(ControlNetBackbone, SDXLBackbone):
    """A trainable ControlNet steering a frozen SDXL UNet.

    Args:
        controlnet: the ControlNet (``addition_embed_type="text_time"``, e.g. ``ControlNetModel.from_unet(unet)``).
        unet: the SDXL UNet it was made for; frozen here.
        image_size: the side of the images its samples decode to (:class:`SDXLBackbone`).
    """

    pipeline_class = "StableDiffusionXLControlNetPipeline"
    condition_names = (PROMPTS, POOLED, TIME_IDS, CONTROL)

    def __init__(
        self, controlnet: ControlNetModel, unet: UNet2DConditionModel, image_size: int | None = None
    ) -> None:
        SDXLBackbone.__init__(self, unet, image_size)
        self.attach(controlnet, unet)

    def base_adapter(self) -> Backbone:
        return SDXLBackbone(self.unet, self.image_size)

    def added_conditions(
        self, cond: Conditioning, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        """The pooled embeddings and size ids, as the pipeline gives both the ControlNet and the UNet."""
        return {
            "added_cond_kwargs": {
                "text_embeds": cond[POOLED].to(device, dtype),
                "time_ids": cond[TIME_IDS].to(device, dtype),
            }
        }
