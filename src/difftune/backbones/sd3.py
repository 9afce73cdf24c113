"""Adapter for Stable Diffusion 3 / 3.5's ``SD3Transformer2DModel`` (an MMDiT on rectified flow).

The condition is two tensors, as ``StableDiffusion3Pipeline`` feeds its transformer:

* ``prompt_embeds`` (N, L_clip + L_t5, D): both CLIP encoders' penultimate hidden states,
  concatenated and zero-padded to T5's width D, followed by T5's last hidden states;
* ``pooled_prompt_embeds`` (N, P1 + P2): both CLIP encoders' projected outputs, concatenated.

The unconditional form is the pipeline's negative branch without a negative prompt: the empty
prompt's embeddings (SD3 encodes ``""``, it does not zero them). The model reads its timestep as
σ·1000, which the flow process gives it (:meth:`difftune.process.flow.FlowProcess.model_input`), as
the pipeline's ``FlowMatchEulerDiscreteScheduler`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import SD3Transformer2DModel

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.sdxl import POOLED
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.backbones.text import prompts_digest
from difftune.errors import UserError


class SD3Backbone(Backbone):
    """An SD3 transformer conditioned on prompt embeddings and pooled embeddings.

    Args:
        model: the ``SD3Transformer2DModel``.
    """

    subfolder = "transformer"
    pipeline_class = "StableDiffusion3Pipeline"
    pipeline_processes = ("flow",)
    condition_names = (PROMPTS, POOLED)
    size_buckets = True  # a latent of any size within pos_embed_max_size (bucket_problem); a static shift

    label = "SD3"  # the model's name in messages

    def __init__(
        self, model: SD3Transformer2DModel, sample_shape: tuple[int, int, int] | None = None
    ) -> None:
        super().__init__()
        cfg = model.config
        self.inner = model
        self.learns_variance = False
        if sample_shape is None:
            size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
            sample_shape = (int(cfg.in_channels), int(size), int(size))
        self.sample_shape = sample_shape
        self.register_buffer("null_prompt", torch.zeros(0), persistent=False)
        self.register_buffer("null_pooled", torch.zeros(0), persistent=False)
        self.bank_prompts = torch.zeros(0)
        self.bank_pooled = torch.zeros(0)
        self._bank_record: dict[str, Any] = {}

    @property
    def joint_attention_dim(self) -> int:
        """Width D of the prompt embeddings the transformer reads (T5's width)."""
        return int(self.source_model.config.joint_attention_dim)

    @property
    def pooled_width(self) -> int:
        """Width P of the pooled embedding (``pooled_projection_dim``)."""
        return int(self.source_model.config.pooled_projection_dim)

    def bucket_problem(self, shape: tuple[int, int, int]) -> str | None:
        """A latent whose sides are not a multiple of the patch size, or that has more patches a side than
        the transformer has positions for (``pos_embed_max_size``)."""
        cfg = self.source_model.config
        patch, most = int(cfg.get("patch_size", 1)), cfg.get("pos_embed_max_size")
        height, width = shape[1], shape[2]
        if height % patch or width % patch:
            return f"its latent {width}x{height} is not a multiple of the patch size {patch}"
        if most is not None and max(height, width) > patch * int(most):
            return (
                f"its latent {width}x{height} has more than the transformer's pos_embed_max_size={most} patches "
                f"of {patch} a side"
            )
        return None

    def set_null(self, embedding: torch.Tensor, pooled: torch.Tensor) -> None:
        """Use ``embedding`` (1, L, D) and ``pooled`` (1, P), the empty prompt's, as the unconditional form."""
        self._check_widths(embedding, pooled, "the text encoders give")
        if embedding.shape[0] != 1 or pooled.shape[0] != 1:
            raise UserError(f"the unconditional form is one prompt's embedding, got {embedding.shape[0]}")
        self.null_prompt = embedding.to(self.null_prompt.device, torch.float32)
        self.null_pooled = pooled.to(self.null_pooled.device, torch.float32)

    def set_bank_prompts(
        self, prompts: Sequence[str], embeddings: torch.Tensor, pooled: torch.Tensor
    ) -> None:
        """Generate knowledge-bank sample ``i`` from prompt ``i mod P`` (embedded (P, L, D), pooled (P, P'))."""
        if not prompts:
            raise UserError("no prompts for the knowledge bank: give bank.prompts or a dataset with captions")
        self.bank_prompts = embeddings.half().cpu()  # as target prompts are cached
        self.bank_pooled = pooled.half().cpu()
        self._bank_record = {
            "num_prompts": len(prompts),
            "prompts_sha256": prompts_digest(prompts),
            "prompt_rule": "i mod P",
        }

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype = self.inner.dtype
        timestep = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        return self.inner(
            hidden_states=x_t.to(dtype),
            encoder_hidden_states=cond[PROMPTS].to(x_t.device, dtype),
            pooled_projections=cond[POOLED].to(x_t.device, dtype),
            timestep=timestep,
        ).sample

    def unconditional(self, n: int, device: torch.device | str = "cpu") -> Conditioning:
        if self.null_prompt.numel() == 0:
            raise UserError(
                f"this {self.label} model has no text encoders attached: load it with its pipeline"
            )
        return Conditioning(
            {
                PROMPTS: self.null_prompt.to(device).expand(n, -1, -1),
                POOLED: self.null_pooled.to(device).expand(n, -1),
            }
        )

    def check_condition(self, cond: Conditioning) -> None:
        missing = [name for name in self.condition_names if name not in cond]
        if missing:
            raise UserError(
                f"this {self.label} model needs {list(self.condition_names)}, got a condition with {list(cond)}"
            )
        self._check_widths(cond[PROMPTS], cond[POOLED], "the condition's embeddings are")

    def _check_widths(self, embeds: torch.Tensor, pooled: torch.Tensor, what: str) -> None:
        if embeds.ndim != 3 or embeds.shape[-1] != self.joint_attention_dim:
            raise UserError(
                f"{what} prompt embeddings of shape {tuple(embeds.shape)} but the transformer reads width "
                f"{self.joint_attention_dim} (joint_attention_dim); use the text encoders of the same pipeline"
            )
        if pooled.ndim != 2 or pooled.shape[-1] != self.pooled_width:
            raise UserError(
                f"{what} pooled embeddings of shape {tuple(pooled.shape)} but the transformer reads width "
                f"{self.pooled_width} (pooled_projection_dim); use the text encoders of the same pipeline"
            )

    def bank_condition(self, indices: torch.Tensor) -> Conditioning:
        """Prompt ``i mod P`` of the bank's prompts (:meth:`set_bank_prompts`)."""
        if self.bank_prompts.numel() == 0:
            raise UserError(f"no prompts set for the knowledge bank of this {self.label} model")
        rows = indices % self.bank_prompts.shape[0]
        return Conditioning({PROMPTS: self.bank_prompts[rows], POOLED: self.bank_pooled[rows]})

    def bank_record(self) -> dict[str, Any]:
        return {**self._bank_record, "conditions": list(self.condition_names)}
