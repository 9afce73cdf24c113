"""The Stable Diffusion 3 / 3.5 family: an ``SD3Transformer2DModel`` with its three text encoders.

Its parts (:class:`~difftune.backbones.sd_family.TextParts`; ``prompts`` is an
:class:`~difftune.backbones.sd3_text.SD3PromptEncoder`) are the text encoders and the pipeline they
come from. Conditions are prompt embeddings and pooled embeddings, built by the stock pipeline's
``encode_prompt`` (float16 when cached with the target latents); the unconditional form is the empty
prompt's embeddings, as the pipeline's negative branch without a negative prompt. The noise process is
the model's own (rectified flow, ``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3.0): training
draws σ on the shifted grid and the model reads σ·1000, as the pipeline samples it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import SD3Transformer2DModel

from difftune.backbones.conditioning import Conditioning
from difftune.backbones.controlnet_sd3 import sd3_controlnet_backbone
from difftune.backbones.family import ConditionRequest, LoadContext, TargetSource, absolute_source, named
from difftune.backbones.lora_layout import pipeline_lora_card, save_transformer_lora
from difftune.backbones.sd3 import SD3Backbone
from difftune.backbones.sd3_text import CLIP_LENGTH, T5_LENGTH, SD3PromptEncoder, load_sd3_prompt_encoder
from difftune.backbones.sd_family import StableDiffusionFamily, TextParts
from difftune.backbones.sd_parts import sd_pipeline
from difftune.backbones.sdxl import POOLED
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.backbones.text import prompts_digest
from difftune.errors import UserError

PIPELINE = "StableDiffusion3Pipeline"
# what model.controlnet goes with: the transformer a ControlNet trains over, or a ControlNet pipeline
CONTROLNET_BASES = ("SD3Transformer2DModel", "SD3ControlNetModel")
# diffusers' SD3 LoRA training (train_dreambooth_lora_sd3.py): both streams' attention projections
ATTENTION = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]


class _SD3Prompts:
    """A target set's SD3 conditions: its captions' embeddings and pooled embeddings."""

    def __init__(self, prompts: SD3PromptEncoder | None, source: TargetSource) -> None:
        if prompts is None:
            raise UserError("an SD3 model was loaded without its text encoders")
        self.prompts = prompts
        self.captions = source.captions()
        self._checked_lengths = False
        self.identity: str | None = f"prompts:{prompts.identity()}:{prompts_digest(self.captions)}"

    def __call__(self, indices: torch.Tensor, images: torch.Tensor, flipped: bool) -> dict[str, torch.Tensor]:
        if not self._checked_lengths:
            self.prompts.warn_truncated(self.captions, "captions")
            self._checked_lengths = True
        embeds, pooled = self.prompts.encode([self.captions[i] for i in indices.tolist()])
        return {PROMPTS: embeds.half(), POOLED: pooled.half()}


class StableDiffusion3Family(StableDiffusionFamily):
    """Stable Diffusion 3 / 3.5 text-to-image: the MMDiT conditioned on three encoders' embeddings."""

    name = "stable_diffusion_3"
    model_classes = ("SD3Transformer2DModel",)
    model_class = SD3Transformer2DModel
    adapter: type[SD3Backbone] = SD3Backbone  # type: ignore[assignment]
    adapter_targets = {"lora": ATTENTION, "svdiff": ATTENTION}
    pipeline = PIPELINE  # the stock pipeline (its LoRA loader, the model card)
    label = "SD3"  # the model's name in messages
    null_length = CLIP_LENGTH + T5_LENGTH  # tokens of a prompt embedding (the dry run's null embedding)
    controlnet_bases: tuple[str, ...] = CONTROLNET_BASES  # a family derived from this one states its own
    # SD3's published pre-training (Esser et al. 2024, "rf/lognorm(0.00, 1.00)"); diffusers' SD3 scripts
    # offer it as --weighting_scheme logit_normal
    pretraining_density = "logit_normal"

    # loading
    def load(self, ctx: LoadContext, model: Any) -> tuple[SD3Backbone, TextParts]:  # type: ignore[override]
        self._refuse_controlnet(ctx)
        backbone = self.backbone(ctx, model)
        text_root = sd_pipeline(ctx.pretrained, ctx.components, ctx.record, "text_encoder")
        components = ctx.components if text_root == ctx.pretrained else {}
        prompts = self.prompt_encoder(text_root, components, ctx)
        backbone.set_null(*prompts.encode([""]))  # the pipeline encodes "" for its negative branch
        return backbone, self.parts(ctx, prompts, ctx.record.get("pipeline") or text_root)

    def backbone(self, ctx: LoadContext, model: Any) -> SD3Backbone:
        """The adapter around the denoiser ``model`` (with ``model.controlnet``: a ControlNet over it)."""
        if ctx.controlnet is not None:
            return sd3_controlnet_backbone(ctx, model)
        return SD3Backbone(model)

    def prompt_encoder(self, text_root: str, components: dict[str, Any], ctx: LoadContext) -> Any:
        """The text encoders of the pipeline ``text_root`` (``components``: its index, when it is the model's)."""
        return load_sd3_prompt_encoder(text_root, components, ctx.revision, ctx.load)

    def parts(self, ctx: LoadContext, prompts: Any, pipeline: str) -> TextParts:
        """What the loaded model keeps beside the denoiser (and where a ControlNet's frozen transformer is)."""
        frozen = (ctx.pretrained, ctx.subfolder) if ctx.controlnet is not None else None
        return TextParts(prompts, pipeline, frozen, ctx.controlnet)

    def peek(self, ctx: LoadContext, model: Any) -> SD3Backbone:  # type: ignore[override]
        """Built on the meta device, with null embeddings of the pipeline's lengths (CLIP's and T5's)."""
        self._refuse_controlnet(ctx)
        backbone = self.backbone(ctx, model)
        backbone.set_null(
            torch.zeros(1, self.null_length, backbone.joint_attention_dim),
            torch.zeros(1, backbone.pooled_width),
        )
        return backbone

    def _refuse_controlnet(self, ctx: LoadContext) -> None:
        if ctx.controlnet is not None and ctx.config.get("_class_name") not in self.controlnet_bases:
            raise UserError(
                f"{ctx.pretrained} holds a {self.model_classes[0]}; difftune trains a ControlNet over SD 1.x / 2.x, "
                f"SDXL, SD3 and Flux only (the {self.label} ControlNet is not supported yet): remove model.controlnet"
            )

    # conditions
    def sample_conditions(self, loaded: Any, request: ConditionRequest) -> tuple[Conditioning, list[str]]:
        request = named(request, loaded)
        self.check_request(request)
        prompts = _encoder(loaded)
        prompts.warn_truncated(request.prompts)
        cond = self.conditions(loaded, *prompts.encode(list(request.prompts)))
        return cond, [f"prompt{k}" for k in range(len(request.prompts))]

    def conditions(self, loaded: Any, embeds: torch.Tensor, pooled: torch.Tensor) -> Conditioning:
        """The condition of prompts embedded ``embeds`` (N, L, D) and ``pooled`` (N, P)."""
        return Conditioning({PROMPTS: embeds, POOLED: pooled})

    def target_conditioner(self, loaded: Any, source: TargetSource) -> _SD3Prompts:  # type: ignore[override]
        return _SD3Prompts(loaded.parts.prompts if loaded.parts is not None else None, source)

    def prepare_bank(self, loaded: Any, inputs: Any) -> None:
        """Bank sample ``i`` is generated from prompt ``i mod P`` of the bank's prompts."""
        encoder = _encoder(loaded)
        prompts = inputs.prompts()
        encoder.warn_truncated(prompts, "bank prompts")
        loaded.backbone.set_bank_prompts(prompts, *encoder.encode(prompts))

    # saved models
    def pipeline_parts(self, loaded: Any) -> dict[str, Any]:
        return _encoder(loaded).parts()

    def pipeline_extras(self, loaded: Any, class_names: list[str]) -> dict[str, Any]:
        return {"image_encoder": [None, None], "feature_extractor": [None, None]}

    def card_notes(self, loaded: Any, directory: Path) -> list[str]:
        """How a stock pipeline loads the LoRA of an adapter run, if it has one."""
        return pipeline_lora_card(directory, self.pipeline, absolute_source(loaded.source))

    def save_lora(self, model: Any, directory: Path) -> None:
        """diffusers' LoRA layout, which the pipeline's ``load_lora_weights`` reads."""
        save_transformer_lora(model, directory, self.pipeline)


def _encoder(loaded: Any) -> SD3PromptEncoder:
    """The text encoders of a loaded SD3 (or Flux) model."""
    if loaded.parts is None:
        raise UserError("this model was loaded without its text encoders: load it with its pipeline")
    return loaded.parts.prompts


STABLE_DIFFUSION_3 = StableDiffusion3Family()
SD3Backbone.family = STABLE_DIFFUSION_3
