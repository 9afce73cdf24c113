"""The Stable Diffusion parts a text-conditional backbone needs beside its UNet: the text encoder and
tokenizer, and, for a ControlNet, the frozen UNet it steers.

They come from the pipeline the model belongs to: the directory or hub id itself when it has them,
else the pipeline a difftune directory records as its origin (``difftune_source.json``).
"""

from __future__ import annotations

from typing import Any

from diffusers import ControlNetModel, UNet2DConditionModel

from difftune.backbones.controlnet import ControlNetBackbone
from difftune.backbones.text import DualPromptEncoder, PromptEncoder, check_tokenizer_fits
from difftune.config.checks import check_model_path
from difftune.errors import UserError

CONDITION_CHANNELS = (16, 32, 96, 256)  # ControlNet's condition embedding: each block after the first halves


def sd_pipeline(pretrained: str, components: dict[str, Any], record: dict[str, Any], part: str) -> str:
    """Where ``part`` (``text_encoder`` or ``unet``) of a text-conditional model is read from.

    Raises:
        UserError: neither the directory nor its recorded origin has it.
    """
    if part in components:
        return pretrained
    if record.get("pipeline"):
        return str(record["pipeline"])
    raise UserError(
        f"{pretrained!r} has no {part}/ and records no Stable Diffusion pipeline it came from; "
        "give the pipeline directory (with unet/, text_encoder/, tokenizer/) as model.pretrained"
    )


def frozen_unet_location(
    pretrained: str, components: dict[str, Any], record: dict[str, Any], part: str = "unet"
) -> tuple[str, str | None]:
    """Where a trained ControlNet's frozen UNet (``part``: its pipeline folder; SD3's ``transformer``)
    is: the directory's own ``<part>/`` (a stock pipeline layout), else the location its
    ``difftune_source.json`` records (as ``unet``), else its pipeline's ``<part>/``."""
    if part in components:
        return pretrained, part
    if record.get("unet"):
        path, subfolder = record["unet"]
        return str(path), subfolder
    return sd_pipeline(pretrained, components, record, part), part


def load_prompt_encoder(pipeline: str, revision: str | None, load: Any) -> PromptEncoder:
    """The CLIP text encoder and tokenizer of ``pipeline`` (``load``: safetensors-only ``from_pretrained``)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer", revision=revision)
    text_encoder = load(CLIPTextModel, pipeline, "text_encoder", revision)
    check_tokenizer_fits(tokenizer, text_encoder, pipeline)
    return PromptEncoder(text_encoder, tokenizer, pipeline)


def load_dual_prompt_encoder(pipeline: str, revision: str | None, load: Any) -> DualPromptEncoder:
    """SDXL's two CLIP text encoders and tokenizers of ``pipeline`` (``text_encoder``/``tokenizer`` and
    ``text_encoder_2``/``tokenizer_2``; ``load``: safetensors-only ``from_pretrained``).

    Raises:
        UserError: the two encoders give prompt embeddings of different lengths.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    parts = []
    for suffix, cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder=f"tokenizer{suffix}", revision=revision)
        text_encoder = load(cls, pipeline, f"text_encoder{suffix}", revision)
        check_tokenizer_fits(tokenizer, text_encoder, pipeline)
        parts.append(PromptEncoder(text_encoder, tokenizer, pipeline))
    if parts[0].max_length != parts[1].max_length:
        raise UserError(
            f"{pipeline}: tokenizer/ makes prompts of {parts[0].max_length} tokens but tokenizer_2/ of "
            f"{parts[1].max_length}; SDXL concatenates both encoders' embeddings, so they must agree "
            "(model_max_length in tokenizer_config.json)"
        )
    return DualPromptEncoder(parts[0], parts[1], pipeline)


def controlnet_backbone(
    controlnet: str, unet: UNet2DConditionModel, revision: str | None, load: Any, downsample: int = 8
) -> ControlNetBackbone:
    """A ControlNet over the SD 1.x / 2.x ``unet``: :func:`controlnet_model`'s, in its adapter."""
    return ControlNetBackbone(controlnet_model(controlnet, unet, revision, load, downsample), unet)


def controlnet_model(
    controlnet: str, unet: UNet2DConditionModel, revision: str | None, load: Any, downsample: int = 8
) -> ControlNetModel:
    """A ControlNet over ``unet`` (SD 1.x / 2.x or SDXL): new from its weights (``controlnet="from_unet"``)
    or loaded.

    ``load`` is the safetensors-only ``from_pretrained``. A new ControlNet's condition embedding
    shrinks control images by ``downsample`` (the VAE's factor; 1 in pixel space), so control images
    have the pixel images' size: diffusers' default for 8, one stride-2 block fewer per halving less.
    """
    if controlnet == "from_unet":
        halvings = max(0, downsample.bit_length() - 1)
        net = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=CONDITION_CHANNELS[: halvings + 1]
        )
    else:
        check_model_path(controlnet, "model.controlnet")
        net = load(ControlNetModel, controlnet, None, revision)
    _check_pair(net, unet)
    return net


def _check_pair(controlnet: ControlNetModel, unet: UNet2DConditionModel) -> None:
    """Refuse a ControlNet whose blocks do not match the UNet's (its residuals would not fit)."""
    ours, theirs = controlnet.config, unet.config
    if (
        list(ours.block_out_channels) != list(theirs.block_out_channels)
        or ours.cross_attention_dim != theirs.cross_attention_dim
        or ours.addition_embed_type != theirs.addition_embed_type  # an SDXL ControlNet over SD 1.5, ...
    ):
        raise UserError(
            f"the ControlNet (blocks {list(ours.block_out_channels)}, text width {ours.cross_attention_dim}) "
            f"does not fit the UNet (blocks {list(theirs.block_out_channels)}, text width "
            f"{theirs.cross_attention_dim}); use a ControlNet made for this Stable Diffusion version"
        )
