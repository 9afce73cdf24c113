"""The SDXL, SD3 and Flux ControlNet families: a trainable ControlNet over a frozen SDXL UNet, SD3
transformer or Flux transformer.

Each is its base model's family (text encoders, prompts, size ids, noise process) with the control
images every ControlNet family shares (:class:`~difftune.backbones.controlnet_family.ControlFamily`:
targets, the bank's own samples annotated, ``--control-image`` files at sampling). A new ControlNet is
made by the base family when ``model.controlnet`` is set (``from_unet``: from the UNet's or the
transformer's weights; else an existing one); these families load the trained one, ``final/controlnet``,
over the frozen model its ``difftune_source.json`` records, and write the stock
``StableDiffusionXLControlNetPipeline`` / ``StableDiffusion3ControlNetPipeline`` /
``FluxControlNetPipeline``.

SDXL's ``ControlNetModel`` has ``addition_embed_type="text_time"``: its family claims those configs of
the class (every other one is SD 1.x / 2.x's), as the SDXL family narrows ``UNet2DConditionModel``.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    ControlNetModel,
    FluxControlNetModel,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

from difftune.backbones.controlnet_family import ControlFamily, frozen_model
from difftune.backbones.controlnet_flux import FluxControlNetBackbone
from difftune.backbones.controlnet_sd3 import SD3ControlNetBackbone, control_vae
from difftune.backbones.controlnet_sdxl import SDXLControlNetBackbone
from difftune.backbones.family import LoadContext
from difftune.backbones.flux_family import TARGETS as FLUX_TARGETS
from difftune.backbones.flux_family import FluxFamily, FluxParts, latent_size
from difftune.backbones.sd3_family import ATTENTION as SD3_ATTENTION
from difftune.backbones.sd3_family import StableDiffusion3Family
from difftune.backbones.sd_family import ATTENTION, TextParts
from difftune.backbones.sd_parts import frozen_unet_location
from difftune.backbones.sdxl_family import StableDiffusionXLFamily, XLParts, image_size


class SDXLControlNetFamily(ControlFamily, StableDiffusionXLFamily):
    """A ControlNet (what trains) steering a frozen SDXL UNet; claims the ``text_time`` ControlNet configs."""

    name = "sdxl_controlnet"
    model_classes = ("ControlNetModel",)  # with the UNet of its pipeline
    model_class = ControlNetModel
    adapter = SDXLControlNetBackbone
    adapter_targets = {"lora": ATTENTION, "svdiff": ATTENTION + ["conv1", "conv2"]}

    def load(self, ctx: LoadContext, model: Any) -> tuple[SDXLControlNetBackbone, XLParts]:  # type: ignore[override]
        """A trained ControlNet, beside the UNet it was trained with."""
        unet, location = frozen_model(ctx, UNet2DConditionModel, "unet")
        backbone = SDXLControlNetBackbone(model, unet, image_size(unet, ctx.downsample))
        return self.xl_parts(ctx, backbone, location)  # type: ignore[return-value]

    def peek(self, ctx: LoadContext, model: Any) -> SDXLControlNetBackbone:
        unet, _ = frozen_model(ctx, UNet2DConditionModel, "unet")
        return self.meta_null(SDXLControlNetBackbone(model, unet, image_size(unet, ctx.downsample)))  # type: ignore[return-value]


class SD3ControlNetFamily(ControlFamily, StableDiffusion3Family):
    """An ``SD3ControlNetModel`` (what trains) steering a frozen SD3 transformer."""

    name = "sd3_controlnet"
    model_classes = ("SD3ControlNetModel",)  # with the transformer of its pipeline
    model_class = SD3ControlNetModel
    adapter = SD3ControlNetBackbone  # type: ignore[assignment]
    adapter_targets = {"lora": SD3_ATTENTION, "svdiff": SD3_ATTENTION}
    pipeline = "StableDiffusion3ControlNetPipeline"

    def backbone(self, ctx: LoadContext, model: Any) -> SD3ControlNetBackbone:
        """A trained ControlNet, beside the transformer it was trained with and the model's VAE."""
        transformer, _ = frozen_model(ctx, SD3Transformer2DModel, "transformer")
        return SD3ControlNetBackbone(model, transformer, control_vae(ctx))

    def parts(self, ctx: LoadContext, prompts: Any, pipeline: str) -> TextParts:
        location = frozen_unet_location(ctx.pretrained, ctx.components, ctx.record, "transformer")
        return TextParts(prompts, pipeline, location, ctx.controlnet)


class FluxControlNetFamily(ControlFamily, FluxFamily):
    """A ``FluxControlNetModel`` (what trains) steering a frozen Flux transformer."""

    name = "flux_controlnet"
    model_classes = ("FluxControlNetModel",)  # with the transformer of its pipeline
    model_class = FluxControlNetModel
    adapter = FluxControlNetBackbone
    adapter_targets = {"lora": FLUX_TARGETS, "svdiff": FLUX_TARGETS}
    pipeline = "FluxControlNetPipeline"

    def backbone(self, ctx: LoadContext, model: Any) -> FluxControlNetBackbone:
        """A trained ControlNet, beside the transformer it was trained with and the model's VAE."""
        transformer, _ = frozen_model(ctx, FluxTransformer2DModel, "transformer")
        vae, guidance = control_vae(ctx), self.adapter_guidance(ctx)
        return FluxControlNetBackbone(model, transformer, vae, latent_size(ctx), guidance)

    def parts(self, ctx: LoadContext, prompts: Any, pipeline: str) -> FluxParts:
        location = frozen_unet_location(ctx.pretrained, ctx.components, ctx.record, "transformer")
        return FluxParts(prompts, pipeline, location, ctx.controlnet, self.backbone_guidance(ctx))


SDXL_CONTROLNET = SDXLControlNetFamily()
SDXLControlNetBackbone.family = SDXL_CONTROLNET
SD3_CONTROLNET = SD3ControlNetFamily()
SD3ControlNetBackbone.family = SD3_CONTROLNET
FLUX_CONTROLNET = FluxControlNetFamily()
FluxControlNetBackbone.family = FLUX_CONTROLNET
