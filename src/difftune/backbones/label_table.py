"""Grow a class-conditional model's label table, so that new classes get label rows of their own.

A task sequence (:mod:`difftune.continual`) gives each stage's classes the rows after those already in
use. When the table has no free rows left it grows: the rows of the learned classes are kept as they
are, the null (unconditional) row stays last, and each new row starts as the mean of the learned rows
(an "average class": neutral, and the same whatever the order of the classes). The model's config
is updated (``num_embeds_ada_norm`` of a DiT, ``num_class_embeds`` of a UNet), so the grown model
saves and loads with stock diffusers.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding

from difftune.errors import UserError

__all__ = ["grow_label_table", "label_rows"]


def label_rows(model: torch.nn.Module) -> int:
    """The number of class rows of ``model``'s label table (the null row not counted).

    Raises:
        UserError: the model is not a class-conditional DiT or UNet.
    """
    if isinstance(model, DiTTransformer2DModel) and model.config.num_embeds_ada_norm is not None:
        return int(model.config.num_embeds_ada_norm)
    if isinstance(model, UNet2DModel) and model.config.num_class_embeds is not None:
        return int(model.config.num_class_embeds) - 1
    raise UserError(
        f"{type(model).__name__} has no class-label table to grow; a task sequence grows the labels of a "
        "class-conditional DiTTransformer2DModel or UNet2DModel"
    )


def _grown(table: torch.nn.Embedding, learned: int, rows: int) -> torch.nn.Embedding:
    """``table`` (``learned`` class rows, then the null row) with ``rows`` class rows, then the null row."""
    weight = table.weight.detach()
    new = torch.empty(rows + 1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    new[:learned] = weight[:learned]
    new[learned:rows] = weight[:learned].mean(dim=0)
    new[rows] = weight[learned]
    grown = torch.nn.Embedding(rows + 1, weight.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        grown.weight.copy_(new)
    grown.weight.requires_grad_(table.weight.requires_grad)
    return grown


def grow_label_table(model: torch.nn.Module, rows: int) -> int:
    """Give ``model`` ``rows`` class rows (plus the null row), in place; return how many it had.

    A table that already has ``rows`` class rows is left alone; one with more is refused (rows are
    never dropped: they hold classes learned earlier).

    Raises:
        UserError: the model has no label table, or more rows than ``rows``.
    """
    learned = label_rows(model)
    if rows < learned:
        raise UserError(
            f"the model's label table has {learned} class rows, more than the {rows} asked for; rows of "
            "learned classes are never dropped"
        )
    if rows == learned:
        return learned
    if isinstance(model, DiTTransformer2DModel):
        for module in model.modules():
            if isinstance(module, LabelEmbedding):  # one per block in diffusers' DiT
                if module.embedding_table.num_embeddings != learned + 1:
                    raise UserError(
                        "the DiT's label embedding has no null row; it cannot take new classes (it was not "
                        "trained with label dropout)"
                    )
                module.embedding_table = _grown(module.embedding_table, learned, rows)
                module.num_classes = rows
        model.register_to_config(num_embeds_ada_norm=rows)
    else:
        model.class_embedding = _grown(model.class_embedding, learned, rows)
        model.register_to_config(num_class_embeds=rows + 1)
    return learned
