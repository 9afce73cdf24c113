"""Adapter for Stable Diffusion XL's ``UNet2DConditionModel`` (``addition_embed_type="text_time"``).

The condition is three tensors, as ``StableDiffusionXLPipeline`` feeds its UNet:

* ``prompt_embeds`` (N, L, D1 + D2): both text encoders' penultimate hidden states, concatenated;
* ``pooled_prompt_embeds`` (N, P): the second text encoder's projected output;
* ``time_ids`` (N, 6): SDXL's size conditioning, ``original_size + crops_coords_top_left + target_size``
  as (height, width) pairs.

The unconditional form is the pipeline's negative branch without a negative prompt: zeros when its
``force_zeros_for_empty_prompt`` is set (SDXL base), else the empty prompt's embeddings; the guidance
drop replaces the two text tensors and keeps each sample's ``time_ids``, as the pipeline gives both
branches the same size conditioning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel

from difftune.backbones.conditioning import Conditioning
from difftune.backbones.stable_diffusion import PROMPTS, TextConditionalBackbone
from difftune.errors import UserError

POOLED = "pooled_prompt_embeds"
TIME_IDS = "time_ids"
TIME_ID_COUNT = 6  # (original height, width, crop top, left, target height, width)


def size_time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """SDXL's ``add_time_ids`` of one image (6,) float32: ``original_size + crops_coords_top_left + target_size``."""
    return torch.tensor([*original, *crop, *target], dtype=torch.float32)


class SDXLBackbone(TextConditionalBackbone):
    """An SDXL UNet conditioned on prompt embeddings, pooled embeddings and size ids.

    Args:
        model: the UNet (``addition_embed_type="text_time"``).
        image_size: the side of the images its samples decode to (the VAE's factor times the UNet's
            sample size): what :meth:`unconditional` and the bank's conditions give as ``time_ids``.
    """

    pipeline_class = "StableDiffusionXLPipeline"
    condition_names = (PROMPTS, POOLED, TIME_IDS)
    addition_embed_type = "text_time"
    size_buckets = True  # a target's time_ids follow its bucket and crop; a bank's, its bucket

    def __init__(self, model: UNet2DConditionModel, image_size: int | None = None) -> None:
        super().__init__(model)
        self.image_size = image_size or 8 * self.sample_shape[-1]
        self.register_buffer("null_pooled", torch.zeros(0), persistent=False)
        self.bank_pooled = torch.zeros(0)

    @property
    def pooled_width(self) -> int:
        """Width P of the pooled embedding the UNet's added embedding takes."""
        cfg = self.source_model.config  # the UNet (a ControlNet steers a frozen one)
        return int(cfg.projection_class_embeddings_input_dim) - TIME_ID_COUNT * int(
            cfg.addition_time_embed_dim
        )

    def default_time_ids(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n, 6) ``time_ids`` of an image of :attr:`image_size`, uncropped: the pipeline's default."""
        side = (self.image_size, self.image_size)
        return size_time_ids(side, (0, 0), side).to(device).expand(n, -1)

    def set_null(self, embedding: torch.Tensor, pooled: torch.Tensor) -> None:
        """Use ``embedding`` (1, L, D) and ``pooled`` (1, P) as the unconditional form."""
        self.set_null_prompt(embedding)
        self._check_pooled(pooled, "the text encoders give")
        self.null_pooled = pooled.to(self.null_pooled.device, torch.float32)

    def set_bank_prompts(  # type: ignore[override]
        self, prompts: Sequence[str], embeddings: torch.Tensor, pooled: torch.Tensor
    ) -> None:
        """Generate knowledge-bank sample ``i`` from prompt ``i mod P`` (embedded (P, L, D), pooled (P, P'))."""
        super().set_bank_prompts(prompts, embeddings)
        self.bank_pooled = pooled.half().cpu()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype = self.inner.dtype
        added = {
            "text_embeds": cond[POOLED].to(x_t.device, dtype),
            "time_ids": cond[TIME_IDS].to(x_t.device, dtype),
        }
        embeds = cond[PROMPTS].to(x_t.device, dtype)
        return self.inner(x_t, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample

    def unconditional(self, n: int, device: torch.device | str = "cpu") -> Conditioning:
        prompts = super().unconditional(n, device)
        return Conditioning(
            {
                **prompts,
                POOLED: self.null_pooled.to(device).expand(n, -1),
                TIME_IDS: self.default_time_ids(n, device),
            }
        )

    def drop(self, cond: Conditioning, mask: torch.Tensor) -> Conditioning:
        """Masked rows get the unconditional text tensors; every row keeps its own ``time_ids``."""
        null = self.unconditional(cond.batch_size, cond.device)
        return cond.where(mask, Conditioning({**null, TIME_IDS: cond[TIME_IDS]}))

    def check_condition(self, cond: Conditioning) -> None:
        missing = [name for name in self.condition_names if name not in cond]
        if missing:
            raise UserError(
                f"an SDXL model needs {list(self.condition_names)}, got a condition with {list(cond)}"
            )
        super().check_condition(cond)
        self._check_pooled(cond[POOLED], "pooled prompt embeddings are")
        if cond[TIME_IDS].shape[1:] != (TIME_ID_COUNT,):
            raise UserError(
                f"SDXL's time_ids are (N, {TIME_ID_COUNT}) (original size, crop, target size), got "
                f"{tuple(cond[TIME_IDS].shape)}"
            )

    def _check_pooled(self, pooled: torch.Tensor, what: str) -> None:
        if pooled.ndim != 2 or pooled.shape[-1] != self.pooled_width:
            raise UserError(
                f"{what} of shape {tuple(pooled.shape)} but the UNet takes pooled embeddings of width "
                f"{self.pooled_width}; load the text encoders of the same pipeline"
            )

    def sized_condition(self, cond: Conditioning, size: tuple[int, int]) -> Conditioning:
        """``cond`` with the ``time_ids`` of an uncropped image of ``size`` = (height, width): a bank's
        samples at a bucket's size, as :meth:`bank_condition` gives those at :attr:`image_size`."""
        ids = size_time_ids(size, (0, 0), size).expand(cond.batch_size, -1).clone()
        return Conditioning({**cond, TIME_IDS: ids.to(cond[TIME_IDS].device)})

    def bank_condition(self, indices: torch.Tensor) -> Conditioning:
        """Prompt ``i mod P`` of the bank's prompts, at the model's own image size."""
        prompts = super().bank_condition(indices)
        rows = indices % self.bank_pooled.shape[0]
        return Conditioning(
            {**prompts, POOLED: self.bank_pooled[rows], TIME_IDS: self.default_time_ids(len(indices)).clone()}
        )
