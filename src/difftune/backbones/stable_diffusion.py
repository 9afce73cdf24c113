"""Adapter for a text-conditional ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x).

The condition is ``{"prompt_embeds": (N, L, D)}``, the text encoder's hidden states; its
unconditional form is the empty prompt's embedding, as the diffusers pipelines use for
classifier-free guidance. Prompts become embeddings outside the backbone
(:class:`~difftune.backbones.text.PromptEncoder`, cached with the target latents).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.text import prompts_digest
from difftune.errors import UserError

PROMPTS = "prompt_embeds"


class TextConditionalBackbone(Backbone):
    """A Stable Diffusion UNet conditioned on prompt embeddings.

    Args:
        model: the UNet.
        null_prompt: the empty prompt's embedding (1, L, D); set later with
            :meth:`set_null_prompt` when the text encoder is loaded after the model.
    """

    subfolder = "unet"
    pipeline_class = "StableDiffusionPipeline"
    condition_names = (PROMPTS,)
    size_buckets = True  # a UNet takes any latent size its down blocks divide
    addition_embed_type: str | None = (
        None  # the UNet's extra conditioning this adapter feeds (SDXL's: text_time)
    )

    def __init__(self, model: UNet2DConditionModel, null_prompt: torch.Tensor | None = None) -> None:
        super().__init__()
        cfg = model.config
        if cfg.addition_embed_type != self.addition_embed_type or cfg.class_embed_type is not None:
            raise UserError(
                f"UNet2DConditionModel with addition_embed_type={cfg.addition_embed_type!r} and "
                f"class_embed_type={cfg.class_embed_type!r} does not fit {type(self).__name__}; supported: "
                "SD 1.x / 2.x UNets (neither set) and SDXL's (addition_embed_type='text_time'), without a ControlNet"
            )
        self.inner = model
        self.learns_variance = cfg.out_channels == 2 * cfg.in_channels
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.sample_shape = (cfg.in_channels, size, size)
        self.register_buffer("null_prompt", torch.zeros(0), persistent=False)
        self.bank_prompts = torch.zeros(0)
        self._bank_record: dict[str, Any] = {}
        if null_prompt is not None:
            self.set_null_prompt(null_prompt)

    @property
    def cross_attention_dim(self) -> int:
        """Width D of the prompt embeddings the UNet attends to."""
        dim = self.inner.config.cross_attention_dim
        return int(dim if isinstance(dim, int) else dim[0])

    def set_null_prompt(self, embedding: torch.Tensor) -> None:
        """Use ``embedding`` (1, L, D), the empty prompt's, as the unconditional form."""
        if embedding.ndim != 3 or embedding.shape[0] != 1 or embedding.shape[-1] != self.cross_attention_dim:
            raise UserError(
                f"the text encoder gives embeddings of shape {tuple(embedding.shape[1:])} but the UNet attends "
                f"to width {self.cross_attention_dim}; load the text encoder of the same pipeline"
            )
        self.null_prompt = embedding.to(self.null_prompt.device, torch.float32)

    def set_bank_prompts(self, prompts: Sequence[str], embeddings: torch.Tensor) -> None:
        """Generate knowledge-bank sample ``i`` from prompt ``i mod P`` of ``prompts`` (P, embedded (P, L, D))."""
        if not prompts:
            raise UserError("no prompts for the knowledge bank: give bank.prompts or a dataset with captions")
        self.bank_prompts = embeddings.half().cpu()  # as target prompts are cached
        self._bank_record = {
            "num_prompts": len(prompts),
            "prompts_sha256": prompts_digest(prompts),
            "prompt_rule": "i mod P",
        }

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        embeds = cond[PROMPTS].to(x_t.device, self.inner.dtype)
        return self.inner(x_t, t, encoder_hidden_states=embeds).sample

    def unconditional(self, n: int, device: torch.device | str = "cpu") -> Conditioning:
        if self.null_prompt.numel() == 0:
            raise UserError(
                "this text-conditional model has no text encoder attached: load it with its pipeline"
            )
        return Conditioning({PROMPTS: self.null_prompt.to(device).expand(n, -1, -1)})

    def check_condition(self, cond: Conditioning) -> None:
        if PROMPTS not in cond:
            raise UserError(
                f"a text-conditional model needs prompt embeddings, got a condition with {list(cond)}"
            )
        width = cond[PROMPTS].shape[-1]
        if width != self.cross_attention_dim:
            raise UserError(
                f"prompt embeddings of width {width} do not fit a UNet that attends to width "
                f"{self.cross_attention_dim}; encode the prompts with the pipeline's own text encoder"
            )

    def bank_condition(self, indices: torch.Tensor) -> Conditioning:
        """Prompt ``i mod P`` of the bank's prompts (:meth:`set_bank_prompts`)."""
        if self.bank_prompts.numel() == 0:
            raise UserError("no prompts set for the knowledge bank of a text-conditional model")
        return Conditioning({PROMPTS: self.bank_prompts[indices % self.bank_prompts.shape[0]]})

    def bank_record(self) -> dict[str, Any]:
        return {**self._bank_record, "conditions": list(self.condition_names)}
