"""A tiny random-init Flux.1-dev pipeline built from configs, with nothing downloaded.

A ``CLIPTextModel`` with the local character-level tokenizer
(:func:`difftune.demos.text_encoder.tiny_text_encoder`: the pooled embedding), a ``T5EncoderModel``
with the character-level ``T5TokenizerFast`` of :func:`difftune.testing.sd3.tiny_t5_encoder` (the
sequence embeddings), a ``FluxTransformer2DModel`` with a guidance embedding (dev) that reads them, a
VAE with 16 latent channels and Flux's ``shift_factor`` and ``scaling_factor``, and Flux.1-dev's
``FlowMatchEulerDiscreteScheduler`` (the resolution-dependent shift).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel

from difftune.demos.text_encoder import tiny_text_encoder
from difftune.testing.models import tiny_vae
from difftune.testing.sd3 import tiny_t5_encoder

FLUX_CLIP_WIDTH = 32  # CLIP-L's width here: the pooled embedding, the transformer's pooled_projection_dim
FLUX_T5_WIDTH = 48  # T5's d_model: the transformer's joint_attention_dim
FLUX_LATENT_CHANNELS = 16
FLUX_VAE_SHIFT, FLUX_VAE_SCALE = 0.1159, 0.3611  # Flux.1's VAE shift_factor and scaling_factor
# FLUX.1-dev's scheduler_config.json: the shift grows with the token count (use_dynamic_shifting)
FLUX_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def tiny_flux_transformer(guidance_embeds: bool = True, seed: int = 0) -> FluxTransformer2DModel:
    """A ``FluxTransformer2DModel`` with one double and one single block (2 heads of 8) over 2x2 patches of
    16-channel latents, reading the tiny encoders' embeddings; with a guidance embedding unless told."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * FLUX_LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=FLUX_T5_WIDTH,
        pooled_projection_dim=FLUX_CLIP_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )


def tiny_flux_vae(seed: int = 0) -> AutoencoderKL:
    """An ``AutoencoderKL`` with 16 latent channels, an 8x downsampling (32x32 images, 4x4 latents), no
    quant convs and Flux's shift and scaling factors."""
    return tiny_vae(
        seed,
        sample_size=32,
        latent_channels=FLUX_LATENT_CHANNELS,
        shift_factor=FLUX_VAE_SHIFT,
        scaling_factor=FLUX_VAE_SCALE,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def save_flux_pipeline(
    root: Path, transformer: FluxTransformer2DModel | None = None, seed: int = 0, guidance_embeds: bool = True
) -> Path:
    """Write a stock ``FluxPipeline`` directory of tiny models (32x32 images, 4x4 latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    clip, clip_tokenizer = tiny_text_encoder(FLUX_CLIP_WIDTH, seed=seed)
    t5, t5_tokenizer = tiny_t5_encoder(FLUX_T5_WIDTH, seed=seed + 1)
    FluxPipeline(
        transformer=transformer or tiny_flux_transformer(guidance_embeds, seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=tiny_flux_vae(seed),
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
    ).save_pretrained(root)
    return root
