"""Prompts to the embeddings a text-conditional denoiser reads (a CLIP text encoder and its tokenizer).

The text side of a Stable Diffusion pipeline, as its ``encode_prompt`` does it for SD 1.x / 2.x: the
prompt padded to the tokenizer's length, the encoder's last hidden state. It is frozen, and its
output is cached beside the target latents, so training never runs it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from difftune.backbones.fingerprint import model_fingerprint
from difftune.errors import UserError

logger = logging.getLogger(__name__)


def prompts_digest(prompts: Sequence[str]) -> str:
    """A short hash of a list of prompts, in order (what caches and bank manifests record of them)."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def check_tokenizer_fits(tokenizer: Any, text_encoder: Any, where: str) -> None:
    """Refuse a tokenizer whose token ids or prompt length its text encoder cannot take (its
    ``vocab_size`` and ``max_position_embeddings``): encoding would fail deep inside the encoder.

    Raises:
        UserError: the message names both sizes and where the pair was read from.
    """
    config = text_encoder.config
    vocab, positions = getattr(config, "vocab_size", None), getattr(config, "max_position_embeddings", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise UserError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the text encoder only {vocab} "
            "(vocab_size); give the tokenizer/ and text_encoder/ of one pipeline"
        )
    if positions is not None and tokenizer.model_max_length > positions:
        raise UserError(
            f"{where}: the tokenizer makes prompts of {tokenizer.model_max_length} tokens (model_max_length) "
            f"but the text encoder has {positions} positions (max_position_embeddings); give the tokenizer/ "
            f"and text_encoder/ of one pipeline, or set model_max_length to {positions} in "
            "tokenizer/tokenizer_config.json"
        )


class PromptEncoder:
    """Encode prompts with a frozen text encoder.

    Args:
        text_encoder: a ``transformers`` text model whose output's first item is the hidden states
            (``CLIPTextModel``).
        tokenizer: its tokenizer (``CLIPTokenizer``).
        source: where they were loaded from (part of :meth:`identity`), or ``None``.
    """

    def __init__(self, text_encoder: Any, tokenizer: Any, source: str | None = None) -> None:
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.source = source

    @property
    def max_length(self) -> int:
        """Tokens per prompt (the tokenizer's ``model_max_length``; 77 for CLIP)."""
        return int(self.tokenizer.model_max_length)

    def count_truncated(self, prompts: Sequence[str]) -> int:
        """How many of ``prompts`` :meth:`encode` cuts short: longer than :attr:`max_length` tokens."""
        unique = sorted(set(prompts))
        if not unique:
            return 0
        ids = self.tokenizer(unique, verbose=False).input_ids  # uncut; verbose=False: no log of its own
        long = {prompt for prompt, tokens in zip(unique, ids, strict=True) if len(tokens) > self.max_length}
        return sum(prompt in long for prompt in prompts)

    def warn_truncated(self, prompts: Sequence[str], what: str = "prompts") -> None:
        """Warn once, with the count, when some of ``prompts`` are longer than the encoder reads."""
        count = self.count_truncated(prompts)
        if count:
            logger.warning(
                "%d of %d %s are longer than the text encoder's %d tokens and are truncated",
                count,
                len(prompts),
                what,
                self.max_length,
            )

    @property
    def width(self) -> int:
        """Width D of an embedding token."""
        return int(self.text_encoder.config.hidden_size)

    def identity(self) -> str:
        """A string that changes when encoding a prompt would give another embedding."""
        if self.source is not None:
            return f"text:{self.source}:{self.max_length}"
        return f"text-weights-{model_fingerprint(self.text_encoder)}:{self.max_length}"

    def to(self, device: torch.device | str) -> PromptEncoder:
        """Move the text encoder to ``device``."""
        self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """``prompts`` (N) -> embeddings (N, L, D) float32 on the CPU, L = :attr:`max_length`."""
        device = next(self.text_encoder.parameters()).device
        out = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(
                list(prompts[start : start + batch_size]),
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            )
            hidden = self.text_encoder(tokens.input_ids.to(device))[0]
            out.append(hidden.float().cpu())
        if not out:
            return torch.zeros(0, self.max_length, self.width)
        return torch.cat(out)


class DualPromptEncoder:
    """Encode prompts as Stable Diffusion XL's pipeline does (``StableDiffusionXLPipeline.encode_prompt``),
    with its two frozen text encoders.

    The prompt embedding is the concatenation of both encoders' penultimate hidden states (N, L,
    D1 + D2); the pooled embedding is the second encoder's projected output (N, P).

    Args:
        first: the first encoder's :class:`PromptEncoder` (``CLIPTextModel`` and ``tokenizer``).
        second: the second's (``CLIPTextModelWithProjection`` and ``tokenizer_2``).
        source: where they were loaded from (part of :meth:`identity`), or ``None``.
    """

    def __init__(self, first: PromptEncoder, second: PromptEncoder, source: str | None = None) -> None:
        self.first, self.second = first, second
        self.source = source

    @property
    def max_length(self) -> int:
        """Tokens per prompt read by the first encoder (the two tokenizers' lengths agree in SDXL)."""
        return self.first.max_length

    @property
    def width(self) -> int:
        """Width D1 + D2 of a prompt-embedding token."""
        return self.first.width + self.second.width

    @property
    def pooled_width(self) -> int:
        """Width P of the pooled embedding (the second encoder's ``projection_dim``)."""
        return int(self.second.text_encoder.config.projection_dim)

    def count_truncated(self, prompts: Sequence[str]) -> int:
        """How many of ``prompts`` either encoder cuts short."""
        return max(self.first.count_truncated(prompts), self.second.count_truncated(prompts))

    def warn_truncated(self, prompts: Sequence[str], what: str = "prompts") -> None:
        """Warn once, with the count, when some of ``prompts`` are longer than the encoders read."""
        count = self.count_truncated(prompts)
        if count:
            logger.warning(
                "%d of %d %s are longer than the text encoder's %d tokens and are truncated",
                count,
                len(prompts),
                what,
                self.max_length,
            )

    def identity(self) -> str:
        """A string that changes when encoding a prompt would give other embeddings."""
        if self.source is not None:
            return f"text-xl:{self.source}:{self.first.max_length}:{self.second.max_length}"
        first, second = (model_fingerprint(p.text_encoder) for p in (self.first, self.second))
        return f"text-xl-weights-{first}-{second}:{self.first.max_length}:{self.second.max_length}"

    def to(self, device: torch.device | str) -> DualPromptEncoder:
        """Move both text encoders to ``device``."""
        self.first.to(device)
        self.second.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` (N) -> ``(embeddings (N, L, D1 + D2), pooled (N, P))``, float32 on the CPU."""
        hidden, pooled = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            states = []
            for part in (self.first, self.second):
                tokens = part.tokenizer(
                    chunk,
                    padding="max_length",
                    max_length=part.max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                device = next(part.text_encoder.parameters()).device
                out = part.text_encoder(tokens.input_ids.to(device), output_hidden_states=True)
                states.append(out.hidden_states[-2].float().cpu())
            hidden.append(torch.cat(states, dim=-1))
            pooled.append(out[0].float().cpu())  # the second encoder's projected text embedding
        if not hidden:
            return torch.zeros(0, self.max_length, self.width), torch.zeros(0, self.pooled_width)
        return torch.cat(hidden), torch.cat(pooled)
