"""A tiny CLIP text encoder and tokenizer built in code, with nothing downloaded, and the random-init
pixel-space text-to-image pipeline of the ControlNet demo and the caption test bed; the tests' tiny
Stable Diffusion pipelines use the encoder too."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import SchedulerMixin, UNet2DConditionModel

_TOKEN_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def tiny_text_encoder(
    width: int = 32, max_length: int = 16, seed: int = 0, projection_dim: int | None = None
) -> tuple[Any, Any]:
    """A 2-layer ``CLIPTextModel`` and a character-level ``CLIPTokenizer`` built from a vocabulary
    written here (letters, digits, punctuation; no merges): ``(text_encoder, tokenizer)``. With
    ``projection_dim``, a ``CLIPTextModelWithProjection`` (SDXL's second text encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {c: i for i, c in enumerate(_TOKEN_CHARS)}
    vocab.update({f"{c}</w>": len(_TOKEN_CHARS) + i for i, c in enumerate(_TOKEN_CHARS)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=max_length
        )
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        **({} if projection_dim is None else {"projection_dim": projection_dim}),
    )
    if projection_dim is not None:
        return CLIPTextModelWithProjection(config), tokenizer
    return CLIPTextModel(config), tokenizer


def save_pixel_text_to_image(
    init: Path,
    seed: int,
    sample_size: int,
    channels: tuple[int, int],
    max_length: int,
    scheduler: SchedulerMixin,
) -> Path:
    """Write (once; an existing one is kept) a random-init pixel-space grey-scale text-to-image pipeline
    to ``init``: a two-level ``UNet2DConditionModel`` of ``channels`` with cross-attention at the lower
    level only (fast on a CPU), a :func:`tiny_text_encoder` of ``max_length`` tokens and ``scheduler``."""
    if (init / "unet" / "config.json").is_file():
        return init
    text_encoder, tokenizer = tiny_text_encoder(width=32, max_length=max_length, seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    unet.save_pretrained(init / "unet")
    text_encoder.save_pretrained(init / "text_encoder")
    tokenizer.save_pretrained(init / "tokenizer")
    scheduler.save_pretrained(init / "scheduler")
    return init
