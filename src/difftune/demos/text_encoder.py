"""A tiny CLIP text encoder and tokenizer built in code, with nothing downloaded: the ControlNet demo's
source pipeline uses it, and so do the tests' tiny Stable Diffusion pipelines."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

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
