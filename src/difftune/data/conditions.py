"""What each cached target sample is conditioned on, computed once with its latents.

The model's family makes the condition tensors (``family.target_conditioner``): class labels,
prompt embeddings of the captions (stored in float16: a CLIP embedding is 77 x 768 numbers per
image), control images (uint8, from the data or from an annotator run on the image), whatever its
backbone reads. This module hands it the target set as a
:class:`~difftune.backbones.family.TargetSource`. A conditioner has an identity that keys the
target cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from difftune.backbones.family import TargetConditioner
from difftune.backbones.loading import LoadedModel

if TYPE_CHECKING:
    from difftune.config.data import DataConfig
    from difftune.data.images import TargetImages


class _Source:
    """A target set as the family reads it: labels, captions, the annotator, the data's control images and
    a bucket's crops."""

    def __init__(self, cfg: DataConfig, target: TargetImages, resolution: int) -> None:
        self.cfg, self.target, self.resolution = cfg, target, resolution
        self.labels = target.labels + cfg.label_offset  # the label rows the model sees
        self.has_controls = target.controls is not None
        self.has_crops = target.cover is not None  # a bucket's images (data.buckets)

    def captions(self) -> list[str]:
        return self.target.caption_list(self.cfg.caption_template)

    def annotator(self) -> Any:
        if not self.cfg.annotator:
            return None
        from difftune.control import build_annotator

        return build_annotator(self.cfg.annotator)

    def crops(self, indices: torch.Tensor, flipped: bool) -> torch.Tensor:
        return self.target.crops(indices, flipped)

    def controls(self, indices: torch.Tensor, flipped: bool) -> torch.Tensor:
        assert self.target.controls is not None
        control = self.target.controls(indices, self.resolution)
        return control.flip(-1) if flipped else control


def target_conditions(
    cfg: DataConfig, loaded: LoadedModel, target: TargetImages, resolution: int
) -> TargetConditioner:
    """The conditions of target images, chunk by chunk: ``conditioner(indices, images, flipped) -> tensors``.

    Args:
        cfg: the ``data`` section (caption template, annotator).
        loaded: the model (its family makes the conditions).
        target: the images, their labels and captions.
        resolution: side of the pixel images (and of control images).

    Raises:
        UserError: the target does not fit the model (labels beyond its classes, no control images, ...).
    """
    return loaded.family.target_conditioner(loaded, _Source(cfg, target, resolution))
