"""A tiny random-init Stable Diffusion 3 pipeline built from configs, with nothing downloaded.

Two ``CLIPTextModelWithProjection`` encoders with the local character-level tokenizer
(:func:`difftune.demos.text_encoder.tiny_text_encoder`), a ``T5EncoderModel`` with a character-level
``T5TokenizerFast`` built here with the ``tokenizers`` library, an ``SD3Transformer2DModel`` that reads
their embeddings, a VAE with SD3's ``shift_factor``, and SD3's ``FlowMatchEulerDiscreteScheduler``
(shift 3.0).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

from difftune.demos.text_encoder import tiny_text_encoder
from difftune.testing.models import tiny_vae

SD3_CLIP_WIDTHS = (16, 24)  # the two CLIP encoders' widths: 40, padded to T5's
SD3_CLIP_PROJECTIONS = (8, 16)  # their projections: pooled embeddings are 24 wide
SD3_T5_WIDTH = 48  # T5's d_model: the transformer's joint_attention_dim
SD3_SHIFT = 3.0  # SD3's FlowMatchEulerDiscreteScheduler shift
SD3_VAE_SHIFT, SD3_VAE_SCALE = 0.0609, 1.5305  # SD3's VAE shift_factor and scaling_factor
_T5_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def tiny_t5_encoder(width: int = SD3_T5_WIDTH, seed: int = 0) -> tuple[Any, Any]:
    """A 2-layer ``T5EncoderModel`` and a character-level ``T5TokenizerFast`` (a Unigram model over
    letters, digits and punctuation, ``</s>`` appended, ``<pad>`` 0): ``(text_encoder, tokenizer)``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -1.0) for c in _T5_CHARS]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend,
        extra_ids=0,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config), tokenizer


def tiny_sd3_transformer(in_channels: int = 4, sample_size: int = 4, seed: int = 0) -> SD3Transformer2DModel:
    """A 2-layer ``SD3Transformer2DModel`` (patch 2, 2 heads of 8) that reads the tiny encoders' embeddings."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=SD3_T5_WIDTH,
        caption_projection_dim=16,
        pooled_projection_dim=sum(SD3_CLIP_PROJECTIONS),
        pos_embed_max_size=8,
    )


def tiny_sd3_vae(seed: int = 0) -> AutoencoderKL:
    """An ``AutoencoderKL`` with 4 latent channels, an 8x downsampling and SD3's shift and scaling factors."""
    return tiny_vae(seed, sample_size=32, shift_factor=SD3_VAE_SHIFT, scaling_factor=SD3_VAE_SCALE)


def save_sd3_pipeline(root: Path, transformer: SD3Transformer2DModel | None = None, seed: int = 0) -> Path:
    """Write a stock ``StableDiffusion3Pipeline`` directory of tiny models (32x32 images, 4x4 latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    encoders = [
        tiny_text_encoder(width, seed=seed + k, projection_dim=projection)
        for k, (width, projection) in enumerate(zip(SD3_CLIP_WIDTHS, SD3_CLIP_PROJECTIONS, strict=True))
    ]
    t5, t5_tokenizer = tiny_t5_encoder(seed=seed + 2)
    StableDiffusion3Pipeline(
        transformer=transformer or tiny_sd3_transformer(seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SHIFT),
        vae=tiny_sd3_vae(seed),
        text_encoder=encoders[0][0],
        tokenizer=encoders[0][1],
        text_encoder_2=encoders[1][0],
        tokenizer_2=encoders[1][1],
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    ).save_pretrained(root)
    return root
