"""Adapter for diffusers' ``DiTTransformer2DModel`` (latent or pixel space)."""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from difftune.backbones.base import ClassConditionalBackbone
from difftune.backbones.conditioning import Conditioning
from difftune.errors import UserError


class DiTBackbone(ClassConditionalBackbone):
    """DiT: labels 0..num_embeds_ada_norm-1, null label = num_embeds_ada_norm.

    diffusers keeps one label embedding per block, each with its own random label dropout in train
    mode, so a sample's label would be dropped in some blocks and kept in others. That dropout is
    switched off here: the classifier-free-guidance drop is done once per sample, through
    :meth:`~difftune.backbones.base.Backbone.drop` (docs/architecture.md, "Known traps").
    """

    subfolder = "transformer"
    pipeline_class = "DiTPipeline"
    shard_units = ("CombinedTimestepLabelEmbeddings",)  # the model calls block 0's embedder itself

    def __init__(self, model: DiTTransformer2DModel) -> None:
        super().__init__()
        self.inner = model
        for module in model.modules():
            if isinstance(module, LabelEmbedding):
                if module.embedding_table.num_embeddings <= module.num_classes:
                    raise UserError(
                        "DiT label embedding has no null row; it cannot be used for guidance-free training"
                    )
                module.dropout_prob = 0.0
        cfg = model.config
        self.num_classes = int(cfg.num_embeds_ada_norm)
        out_channels = cfg.out_channels or cfg.in_channels
        self.learns_variance = out_channels == 2 * cfg.in_channels
        self.sample_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.inner(x_t, timestep=t, class_labels=cond["labels"]).sample
