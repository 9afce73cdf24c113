"""Adapter for a class-conditional diffusers ``UNet2DModel``."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from difftune.backbones.base import ClassConditionalBackbone
from difftune.backbones.conditioning import Conditioning
from difftune.errors import UserError


class UNetBackbone(ClassConditionalBackbone):
    """Class-conditional UNet2DModel (``num_class_embeds`` set, ``class_embed_type`` None).

    Convention: the last embedding row is the null label, so a UNet with ``num_class_embeds = K + 1``
    has K classes. Models pre-trained by difftune follow it.
    """

    subfolder = "unet"

    def __init__(self, model: UNet2DModel) -> None:
        super().__init__()
        cfg = model.config
        if cfg.num_class_embeds is None or cfg.class_embed_type is not None:
            raise UserError(
                "UNet2DModel is not class-conditional: set num_class_embeds (classes + 1 null row) "
                "and leave class_embed_type unset"
            )
        self.inner = model
        self.num_classes = int(cfg.num_class_embeds) - 1
        self.learns_variance = cfg.out_channels == 2 * cfg.in_channels
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.sample_shape = (cfg.in_channels, size, size)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.inner(x_t, t, class_labels=cond["labels"]).sample
