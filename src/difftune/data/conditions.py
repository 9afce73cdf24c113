"""What each cached target sample is conditioned on, computed once with its latents.

A backbone names the tensors its condition bundle holds (``Backbone.condition_names``); this module
makes them for a target set: class labels, prompt embeddings of the captions (stored in float16: a
CLIP embedding is 77 x 768 numbers per image), and control images (uint8, from the data or from an
annotator run on the image). A condition source has an identity that keys the target cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from difftune.backbones.controlnet import CONTROL, to_uint8
from difftune.backbones.loading import LoadedModel
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.backbones.text import prompts_digest
from difftune.errors import UserError

if TYPE_CHECKING:
    from difftune.config.data import DataConfig
    from difftune.data.images import TargetImages


class TargetConditions:
    """Conditions of target images, chunk by chunk: ``source(indices, images, flipped) -> tensors``.

    Args:
        cfg: the ``data`` section (caption template, annotator).
        loaded: the model (its backbone's condition names, its text encoder).
        target: the images, their labels and captions.
        resolution: side of the pixel images (and of control images).
    """

    def __init__(self, cfg: DataConfig, loaded: LoadedModel, target: TargetImages, resolution: int) -> None:
        self.names = loaded.backbone.condition_names
        self.target = target
        self.resolution = resolution
        self.prompts = loaded.prompts
        self._checked_lengths = False
        self.annotator = None
        parts: list[str] = []
        if PROMPTS in self.names:
            if self.prompts is None:
                raise UserError("a text-conditional model was loaded without its text encoder")
            self.captions = target.caption_list(cfg.caption_template)
            parts.append(f"prompts:{self.prompts.identity()}:{prompts_digest(self.captions)}")
        if CONTROL in self.names:
            if cfg.annotator:
                from difftune.control import build_annotator

                self.annotator = build_annotator(cfg.annotator)
                parts.append(f"annotator:{self.annotator.record()}")
            elif target.controls is None:
                raise UserError(
                    "a ControlNet needs control images: set data.annotator (e.g. canny) or data.control_column"
                )
            else:
                parts.append("controls:data")
        self.identity = (
            ";".join(parts) or None
        )  # None: labels only (the cache format of class-conditional runs)

    def __call__(self, indices: torch.Tensor, images: torch.Tensor, flipped: bool) -> dict[str, torch.Tensor]:
        """The conditions of images ``indices`` (``images``: their pixels in [-1, 1], mirrored if ``flipped``)."""
        out: dict[str, torch.Tensor] = {}
        if "labels" in self.names or not self.names:
            out["labels"] = self.target.labels[indices]
        if PROMPTS in self.names:
            assert self.prompts is not None
            if not self._checked_lengths:  # once, when the first chunk is encoded (not for a cached set)
                self.prompts.warn_truncated(self.captions, "captions")
                self._checked_lengths = True
            out[PROMPTS] = self.prompts.encode([self.captions[i] for i in indices.tolist()]).half()
        if CONTROL in self.names:
            if self.annotator is not None:
                control = self.annotator(images.cpu().float())
            else:
                assert self.target.controls is not None
                control = self.target.controls(indices, self.resolution)
                control = control.flip(-1) if flipped else control
            out[CONTROL] = to_uint8(control)
        return out
