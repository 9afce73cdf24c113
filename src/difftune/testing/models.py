"""Tiny random-init diffusers models built from configs, for tests, benchmarks and scripts.

Nothing is downloaded: each builder seeds torch and constructs the model from its config, so the
same call gives the same weights everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DiTTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

from difftune.demos.text_encoder import tiny_text_encoder
from difftune.process.schedulers import make_scheduler

__all__ = [
    "save_pipeline_dir",
    "save_sd_pipeline",
    "save_sdxl_pipeline",
    "tiny_cond_unet",
    "tiny_controlnet",
    "tiny_dit",
    "tiny_sdxl_unet",
    "tiny_text_encoder",
    "tiny_unet",
    "tiny_vae",
]


def tiny_dit(
    in_channels: int = 1, sample_size: int = 8, num_classes: int = 5, learn_sigma: bool = True, seed: int = 0
) -> DiTTransformer2DModel:
    """A 2-layer DiT with patch size 2 (a few thousand parameters)."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_layers=2,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=1,
    )


def tiny_unet(in_channels: int = 1, sample_size: int = 8, num_classes: int = 5, seed: int = 0) -> UNet2DModel:
    """A class-conditional UNet2DModel with a null label row (num_class_embeds = classes + 1)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_classes + 1,
    )


def tiny_vae(seed: int = 0, sample_size: int = 16, **config: Any) -> AutoencoderKL:
    """An AutoencoderKL with 4 latent channels and an 8x downsampling (16x16 images -> 2x2); ``config``
    adds to or replaces its configuration (e.g. SD3's ``shift_factor``)."""
    torch.manual_seed(seed)
    defaults: dict[str, Any] = {"latent_channels": 4}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=sample_size,
        **{**defaults, **config},
    )


def save_pipeline_dir(
    root: Path,
    model: torch.nn.Module,
    subfolder: str,
    vae: AutoencoderKL | None = None,
    num_train_timesteps: int = 1000,
) -> Path:
    """Write a pipeline-like directory: <subfolder>/, scheduler/ and optionally vae/."""
    model.save_pretrained(root / subfolder)
    make_scheduler(num_train_timesteps=num_train_timesteps).save_pretrained(root / "scheduler")
    if vae is not None:
        vae.save_pretrained(root / "vae")
    return root


def tiny_cond_unet(
    in_channels: int = 4, sample_size: int = 4, cross_attention_dim: int = 32, seed: int = 0
) -> UNet2DConditionModel:
    """A text-conditional UNet2DConditionModel with one cross-attention block (Stable Diffusion's layout)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def tiny_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """``ControlNetModel.from_unet(unet)`` with its zero convolutions made random, so that it changes
    the UNet's output (a new ControlNet does not)."""
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 16))
    torch.manual_seed(seed)
    for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
        torch.nn.init.normal_(block.weight, std=0.1)
    return net


def save_sd_pipeline(
    root: Path, unet: UNet2DConditionModel | None = None, seed: int = 0, controlnet: bool = False
) -> Path:
    """Write a stock ``StableDiffusionPipeline`` directory of tiny models (32x32 images, 4x4 latents);
    with ``controlnet``, a ``StableDiffusionControlNetPipeline`` with a :func:`tiny_controlnet`."""
    from diffusers import (
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )  # imports transformers' pipelines

    text_encoder, tokenizer = tiny_text_encoder(seed=seed)
    unet = unet or tiny_cond_unet(seed=seed)
    parts: dict[str, Any] = {
        "vae": tiny_vae(seed),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": make_scheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    if controlnet:
        StableDiffusionControlNetPipeline(**parts, controlnet=tiny_controlnet(unet, seed)).save_pretrained(
            root
        )
    else:
        StableDiffusionPipeline(**parts).save_pretrained(root)
    return root


SDXL_TEXT_WIDTHS = (32, 48)  # the two tiny text encoders' widths: prompt embeddings are 80 wide
SDXL_POOLED_WIDTH = 24  # the second encoder's projection
SDXL_TIME_EMBED = 8  # addition_time_embed_dim: each of the 6 size ids embedded in 8 numbers


def tiny_sdxl_unet(in_channels: int = 4, sample_size: int = 4, seed: int = 0) -> UNet2DConditionModel:
    """An SDXL-style UNet2DConditionModel (``addition_embed_type="text_time"``) that takes the tiny
    encoders' embeddings (:data:`SDXL_TEXT_WIDTHS` concatenated, :data:`SDXL_POOLED_WIDTH` pooled)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=sum(SDXL_TEXT_WIDTHS),
        attention_head_dim=4,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_POOLED_WIDTH,
    )


def save_sdxl_pipeline(
    root: Path, unet: UNet2DConditionModel | None = None, seed: int = 0, scheduler: str = "euler"
) -> Path:
    """Write a stock ``StableDiffusionXLPipeline`` directory of tiny models (32x32 images, 4x4 latents):
    :func:`tiny_sdxl_unet`, a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` with the local
    character-level tokenizer, :func:`tiny_vae`, and SDXL's ``EulerDiscreteScheduler`` (``scheduler="ddpm"``:
    a ``DDPMScheduler``)."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

    text_encoder, tokenizer = tiny_text_encoder(SDXL_TEXT_WIDTHS[0], seed=seed)
    text_encoder_2, tokenizer_2 = tiny_text_encoder(
        SDXL_TEXT_WIDTHS[1], seed=seed + 1, projection_dim=SDXL_POOLED_WIDTH
    )
    betas = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
    }
    schedulers = {
        "euler": lambda: EulerDiscreteScheduler(**betas, steps_offset=1, timestep_spacing="leading"),
        "ddpm": lambda: DDPMScheduler(**betas, steps_offset=1, clip_sample=False),
    }
    StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet or tiny_sdxl_unet(seed=seed),
        scheduler=schedulers[scheduler](),
        add_watermarker=False,
    ).save_pretrained(root)
    return root
