"""The Stable Diffusion XL family: SDXL's ``UNet2DConditionModel`` with its two text encoders.

It claims the ``UNet2DConditionModel`` configs with ``addition_embed_type="text_time"`` (every other
one is Stable Diffusion 1.x / 2.x's). Its parts (:class:`XLParts`) are the two text encoders
(:class:`~difftune.backbones.text.DualPromptEncoder`), the pipeline they come from and its
``force_zeros_for_empty_prompt``, which decides the unconditional form as the stock pipeline does.
Conditions are prompt embeddings and pooled embeddings (float16 when cached with the target latents)
and the size ids ``time_ids``: a target image's are its training resolution, uncropped (with
``data.buckets``: its original size, the offsets of its centre crop in the resized image's pixels and
its bucket's size, as diffusers' ``train_text_to_image_sdxl.py`` computes them); a bank's and a sample's
the model's own image size, uncropped (a bank's bucket's size with ``data.buckets``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from difftune.backbones.conditioning import Conditioning
from difftune.backbones.controlnet_sdxl import SDXLControlNetBackbone
from difftune.backbones.family import ConditionRequest, LoadContext, TargetSource, absolute_source, named
from difftune.backbones.lora_layout import pipeline_lora_card, save_pipeline_lora
from difftune.backbones.sd_family import ATTENTION, StableDiffusionFamily, TextParts
from difftune.backbones.sd_parts import controlnet_model, load_dual_prompt_encoder, sd_pipeline
from difftune.backbones.sdxl import POOLED, TIME_IDS, SDXLBackbone, size_time_ids
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.backbones.text import DualPromptEncoder, prompts_digest
from difftune.errors import UserError

PIPELINE = "StableDiffusionXLPipeline"
ZEROS = (
    "force_zeros_for_empty_prompt"  # the pipeline's config: the negative branch is zeros, not ""'s embedding
)
META_TOKENS = 77  # CLIP's sequence length, for the null embeddings of a model built on the meta device


@dataclass
class XLParts(TextParts):
    """What an SDXL model keeps beside its UNet (``prompts`` is a :class:`DualPromptEncoder`).

    Attributes:
        zeros_for_empty: the pipeline's ``force_zeros_for_empty_prompt``: the unconditional form is
            zeros, not the empty prompt's embeddings.
    """

    zeros_for_empty: bool = True


class _XLPrompts:
    """A target set's SDXL conditions: its captions' embeddings and its images' size ids."""

    def __init__(self, prompts: DualPromptEncoder | None, source: TargetSource) -> None:
        if prompts is None:
            raise UserError("an SDXL model was loaded without its text encoders")
        self.prompts = prompts
        self.captions = source.captions()
        self._checked_lengths = False
        # a bucket's images (data.buckets) carry their original sizes and crops; a source that says
        # nothing of crops has square images at the training resolution
        self.source = source if getattr(source, "has_crops", False) else None
        # time_ids: the image as trained (original = target size, no crop; the resolution keys the
        # cache), or a bucket's: original size, crop, bucket size
        ids = "trained" if self.source is None else "original_crop_bucket"
        self.identity: str | None = (
            f"prompts:{prompts.identity()}:{prompts_digest(self.captions)};time_ids:{ids}"
        )

    def __call__(self, indices: torch.Tensor, images: torch.Tensor, flipped: bool) -> dict[str, torch.Tensor]:
        if not self._checked_lengths:
            self.prompts.warn_truncated(self.captions, "captions")
            self._checked_lengths = True
        embeds, pooled = self.prompts.encode([self.captions[i] for i in indices.tolist()])
        side = (int(images.shape[-2]), int(images.shape[-1]))
        ids = size_time_ids(side, (0, 0), side).expand(len(indices), -1).clone()
        if self.source is not None:  # diffusers' train_text_to_image_sdxl.py: original size, crop, target
            ids[:, :4] = self.source.crops(indices, flipped).float()
        return {PROMPTS: embeds.half(), POOLED: pooled.half(), TIME_IDS: ids}


class StableDiffusionXLFamily(StableDiffusionFamily):
    """Stable Diffusion XL text-to-image: the UNet conditioned on both encoders' embeddings and size ids."""

    name = "stable_diffusion_xl"
    model_classes = ("UNet2DConditionModel",)
    model_class = UNet2DConditionModel
    adapter: type[SDXLBackbone] = SDXLBackbone
    adapter_targets = {"lora": ATTENTION, "svdiff": ATTENTION + ["conv1", "conv2"]}

    def claims(self, config: Mapping[str, Any]) -> bool:
        return config.get("addition_embed_type") == "text_time"

    # loading
    def load(self, ctx: LoadContext, model: Any) -> tuple[SDXLBackbone, XLParts]:
        """The UNet, or with ``model.controlnet`` a ControlNet over it, and both text encoders."""
        if ctx.controlnet is None:
            return self.xl_parts(ctx, SDXLBackbone(model, image_size(model, ctx.downsample)), None)
        net = controlnet_model(ctx.controlnet, model, ctx.revision, ctx.load, ctx.downsample)
        backbone = SDXLControlNetBackbone(net, model, image_size(model, ctx.downsample))
        return self.xl_parts(ctx, backbone, (ctx.pretrained, ctx.subfolder))

    def xl_parts(
        self, ctx: LoadContext, backbone: SDXLBackbone, frozen_unet: tuple[str, str | None] | None
    ) -> tuple[SDXLBackbone, XLParts]:
        """Load both text encoders of the model's pipeline and give ``backbone`` its unconditional form."""
        text_root = sd_pipeline(ctx.pretrained, ctx.components, ctx.record, "text_encoder")
        prompts = load_dual_prompt_encoder(text_root, ctx.revision, ctx.load)
        config = ctx.components if text_root == ctx.pretrained else _pipeline_config(text_root, ctx.revision)
        zeros = bool(config.get(ZEROS, True))  # StableDiffusionXLPipeline's default
        embeds, pooled = prompts.encode([""])
        if zeros:
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        backbone.set_null(embeds, pooled)
        pipeline = ctx.record.get("pipeline") or text_root
        return backbone, XLParts(prompts, pipeline, frozen_unet, ctx.controlnet, zeros_for_empty=zeros)

    def peek(self, ctx: LoadContext, model: Any) -> SDXLBackbone:
        """Built on the meta device (a new ControlNet over it with ``model.controlnet``)."""
        size = image_size(model, ctx.downsample)
        if ctx.controlnet is None:
            return self.meta_null(SDXLBackbone(model, size))
        return self.meta_null(SDXLControlNetBackbone(ControlNetModel.from_unet(model), model, size))

    @staticmethod
    def meta_null(backbone: SDXLBackbone) -> SDXLBackbone:
        """``backbone`` with null embeddings of CLIP's length (what the memory estimate traces)."""
        width = backbone.cross_attention_dim
        backbone.set_null(torch.zeros(1, META_TOKENS, width), torch.zeros(1, backbone.pooled_width))
        return backbone

    # conditions
    def sample_conditions(self, loaded: Any, request: ConditionRequest) -> tuple[Conditioning, list[str]]:
        request = named(request, loaded)
        self.check_request(request)
        prompts = _encoder(loaded)
        prompts.warn_truncated(request.prompts)
        embeds, pooled = prompts.encode(list(request.prompts))
        ids = loaded.backbone.default_time_ids(len(request.prompts)).clone()
        cond = Conditioning({PROMPTS: embeds, POOLED: pooled, TIME_IDS: ids})
        return cond, [f"prompt{k}" for k in range(len(request.prompts))]

    def target_conditioner(self, loaded: Any, source: TargetSource) -> _XLPrompts:
        return _XLPrompts(loaded.parts.prompts if loaded.parts is not None else None, source)

    def prepare_bank(self, loaded: Any, inputs: Any) -> None:
        """Bank sample ``i`` is generated from prompt ``i mod P`` of the bank's prompts."""
        encoder = _encoder(loaded)
        prompts = inputs.prompts()
        encoder.warn_truncated(prompts, "bank prompts")
        loaded.backbone.set_bank_prompts(prompts, *encoder.encode(prompts))

    # saved models
    def pipeline_parts(self, loaded: Any) -> dict[str, Any]:
        prompts = _encoder(loaded)
        return {
            "text_encoder": prompts.first.text_encoder,
            "text_encoder_2": prompts.second.text_encoder,
            "tokenizer": prompts.first.tokenizer,
            "tokenizer_2": prompts.second.tokenizer,
        }

    def pipeline_extras(self, loaded: Any, class_names: list[str]) -> dict[str, Any]:
        zeros = loaded.parts.zeros_for_empty if loaded.parts is not None else True
        return {"image_encoder": [None, None], "feature_extractor": [None, None], ZEROS: zeros}

    def card_notes(self, loaded: Any, directory: Path) -> list[str]:
        """How a stock pipeline loads the LoRA of an adapter run, if it has one."""
        return pipeline_lora_card(directory, PIPELINE, absolute_source(loaded.source))

    def save_lora(self, model: Any, directory: Path) -> None:
        """diffusers' LoRA layout, which ``StableDiffusionXLPipeline.load_lora_weights`` reads."""
        save_pipeline_lora(model, directory, PIPELINE)


def image_size(model: UNet2DConditionModel, downsample: int) -> int:
    """The side of the images an SDXL UNet's samples decode to."""
    size = model.config.sample_size
    return int(size if isinstance(size, int) else size[0]) * downsample


def _pipeline_config(root: str, revision: str | None) -> dict[str, Any]:
    """The ``model_index.json`` of the pipeline at ``root`` (a path or hub id), or ``{}``."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(root, revision=revision))
    except Exception:  # no pipeline index there: the pipeline's defaults hold
        return {}


def _encoder(loaded: Any) -> DualPromptEncoder:
    """The text encoders of a loaded SDXL model."""
    if loaded.parts is None:
        raise UserError("an SDXL model was loaded without its text encoders: load it with its pipeline")
    return loaded.parts.prompts


STABLE_DIFFUSION_XL = StableDiffusionXLFamily()
SDXLBackbone.family = STABLE_DIFFUSION_XL
