"""The Flux.1 family: a ``FluxTransformer2DModel`` with its CLIP-L and T5 text encoders.

Built on the SD3 family (:mod:`difftune.backbones.sd3_family`), which it shares all but these with:

* conditions: T5's sequence embeddings and CLIP-L's pooled embedding, from ``FluxPipeline``'s own
  ``encode_prompt`` (:class:`~difftune.backbones.sd3_text.FluxPromptEncoder`), and for a
  guidance-distilled model (dev: ``guidance_embeds``) the guidance embedding's value: ``model.guidance``,
  else what the saved model records, else ``FluxPipeline``'s 3.5. Bank sample ``i`` stores the value it
  was generated with and trains with it; target rows train with the configured one (it keys the
  target cache);
* the sample size: the VAE's sample size over its downsampling (1024 / 8 = 128 for Flux.1, which is
  ``FluxPipeline``'s ``default_sample_size``), 128 when the pipeline has no VAE config;
* the noise process: rectified flow with Flux's resolution-dependent shift, fixed for that size
  (:func:`difftune.process.flow.fixed_shift`; the sampler gets μ as ``FluxPipeline`` computes it);
* LoRA: the modules diffusers' ``train_dreambooth_lora_flux.py`` adapts by default, saved for
  ``FluxPipeline.load_lora_weights``;
* ``model.controlnet``: a ``FluxControlNetModel`` over the frozen transformer
  (:mod:`~difftune.backbones.controlnet_flux`; ``from_unet`` makes a new one as
  ``FluxControlNetModel.from_transformer`` does), whose trained form the ``flux_controlnet`` family
  (:mod:`~difftune.backbones.controlnet_families`) loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel

from difftune.backbones.conditioning import Conditioning
from difftune.backbones.controlnet_flux import flux_controlnet_backbone
from difftune.backbones.family import LoadContext, PreflightFacts, TargetSource, model_line
from difftune.backbones.flux import FLUX_GUIDANCE, FLUX_SAMPLE_SIZE, GUIDANCE, FluxBackbone
from difftune.backbones.sd3_family import StableDiffusion3Family, _SD3Prompts
from difftune.backbones.sd3_text import FLUX_T5_LENGTH, FluxPromptEncoder, load_flux_prompt_encoder
from difftune.backbones.sd_family import TextParts

PIPELINE = "FluxPipeline"
# diffusers' Flux LoRA training (train_dreambooth_lora_flux.py, its default --lora_layers): both streams'
# attention projections and feed-forward layers of the double blocks; attn.to_q/k/v also match the
# single blocks' attention
TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


@dataclass
class FluxParts(TextParts):
    """:class:`TextParts` and the guidance embedding's value the model conditions on (``None`` without one)."""

    guidance: float | None = None


class _FluxPrompts(_SD3Prompts):
    """A target set's Flux conditions: its captions' embeddings and (dev) the configured guidance value."""

    def __init__(
        self, prompts: FluxPromptEncoder | None, source: TargetSource, backbone: FluxBackbone
    ) -> None:
        super().__init__(prompts, source)  # type: ignore[arg-type]
        self.backbone = backbone
        if backbone.guided:  # the value is part of each cached row
            self.identity = f"{self.identity}:guidance={backbone.guidance!r}"

    def __call__(self, indices: torch.Tensor, images: torch.Tensor, flipped: bool) -> dict[str, torch.Tensor]:
        return {**super().__call__(indices, images, flipped), **self.backbone.guidance_column(len(indices))}


class FluxFamily(StableDiffusion3Family):
    """Flux.1 text-to-image: the MMDiT conditioned on T5, CLIP-L's pooled embedding and (dev) a guidance value."""

    name = "flux"
    model_classes = ("FluxTransformer2DModel",)
    model_class = FluxTransformer2DModel
    adapter: type[FluxBackbone] = FluxBackbone  # type: ignore[assignment]
    adapter_targets = {"lora": TARGETS, "svdiff": TARGETS}
    pipeline = PIPELINE
    label = "Flux"
    null_length = FLUX_T5_LENGTH
    controlnet_bases = ("FluxTransformer2DModel", "FluxControlNetModel")  # model.controlnet goes with these
    pretraining_density = "uniform"  # not published; diffusers' Flux scripts sample σ uniformly by default

    # loading
    def backbone(self, ctx: LoadContext, model: Any) -> FluxBackbone:
        """The adapter around the transformer ``model`` (with ``model.controlnet``: a ControlNet over it)."""
        if ctx.controlnet is not None:
            return flux_controlnet_backbone(ctx, model, latent_size(ctx), self.adapter_guidance(ctx))
        return FluxBackbone(model, latent_size(ctx), self.adapter_guidance(ctx))

    def prompt_encoder(
        self, text_root: str, components: dict[str, Any], ctx: LoadContext
    ) -> FluxPromptEncoder:
        return load_flux_prompt_encoder(text_root, ctx.revision, ctx.load)

    def parts(self, ctx: LoadContext, prompts: Any, pipeline: str) -> FluxParts:
        text = super().parts(ctx, prompts, pipeline)  # with a ControlNet: its frozen transformer, its start
        return FluxParts(prompts, pipeline, text.frozen_unet, text.controlnet, self.backbone_guidance(ctx))

    def adapter_guidance(self, ctx: LoadContext) -> float:
        """The guidance value of the conditions an adapter of ``ctx`` makes: :meth:`backbone_guidance`, else
        ``FluxPipeline``'s 3.5 (which a model without a guidance embedding ignores)."""
        guidance = self.backbone_guidance(ctx)
        return FLUX_GUIDANCE if guidance is None else guidance

    def backbone_guidance(self, ctx: LoadContext) -> float | None:
        """The guidance value a model of ``ctx`` conditions on, or ``None`` without a guidance embedding."""
        if not ctx.config.get("guidance_embeds"):
            return None
        return float(ctx.guidance if ctx.guidance is not None else ctx.record.get("guidance", FLUX_GUIDANCE))

    def tuning_base(self, parts: Any) -> dict[str, Any]:
        base = super().tuning_base(parts)
        if parts is not None and parts.guidance is not None:  # an adapter samples with it on its base
            base["guidance"] = parts.guidance
        return base

    def source_record(self, parts: Any) -> dict[str, Any]:
        record = super().source_record(parts)
        if parts is not None and parts.guidance is not None:  # what sampling the saved model uses
            record["guidance"] = parts.guidance
        return record

    # conditions
    def conditions(self, loaded: Any, embeds: torch.Tensor, pooled: torch.Tensor) -> Conditioning:
        return Conditioning(
            {**super().conditions(loaded, embeds, pooled), **loaded.backbone.guidance_column(len(embeds))}
        )

    def target_conditioner(self, loaded: Any, source: TargetSource) -> _FluxPrompts:  # type: ignore[override]
        return _FluxPrompts(
            loaded.parts.prompts if loaded.parts is not None else None, source, loaded.backbone
        )

    def preflight_lines(self, backbone: Any, facts: PreflightFacts) -> list[str]:
        names = ", ".join(backbone.condition_names)
        guided = (
            " (a guidance embedding: model.guidance, default 3.5)"
            if GUIDANCE in backbone.condition_names
            else ""
        )
        return [model_line(backbone, f"conditioned on {names}{guided}; {facts.target_line()}")]

    # saved models
    def sample_flags(self, loaded: Any) -> str:
        """A guidance-distilled model samples without true CFG, as ``FluxPipeline`` does by default."""
        flags = super().sample_flags(loaded)
        return f"{flags} --guidance-scale 1" if GUIDANCE in loaded.backbone.condition_names else flags

    def card_notes(self, loaded: Any, directory: Path) -> list[str]:
        notes = super().card_notes(loaded, directory)
        if GUIDANCE in loaded.backbone.condition_names:
            notes += [
                "",
                f"Trained with the guidance embedding at {loaded.backbone.guidance:g}: pass "
                f"`guidance_scale={loaded.backbone.guidance:g}` to `FluxPipeline`.",
            ]
        return notes


def latent_size(ctx: LoadContext) -> int:
    """The model's latent height and width: its VAE's ``sample_size`` over the downsampling, or
    ``FluxPipeline``'s ``default_sample_size`` (128) when no VAE config can be read."""
    source: str | None = None
    subfolder: str | None = None
    if "vae" in ctx.components:
        source, subfolder = ctx.pretrained, "vae"
    elif ctx.record.get("vae"):
        source, subfolder = ctx.record["vae"], ctx.record.get("vae_subfolder")
    if source is None:
        return FLUX_SAMPLE_SIZE
    try:
        config = AutoencoderKL.load_config(
            source, subfolder=subfolder, revision=ctx.revision, local_files_only=ctx.local_only
        )
    except OSError:
        return FLUX_SAMPLE_SIZE
    size = config.get("sample_size")
    size = size[0] if isinstance(size, list | tuple) else size
    downsample = 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1)
    return int(size) // downsample if size else FLUX_SAMPLE_SIZE


FLUX = FluxFamily()
FluxBackbone.family = FLUX
