"""Prompts to Stable Diffusion 3's embeddings, with the stock pipeline's own ``encode_prompt``.

SD3 conditions on three frozen text encoders (CLIP-L, CLIP-G and T5-XXL). The embeddings are built by
``StableDiffusion3Pipeline.encode_prompt`` itself, on a pipeline made of the text encoders and
tokenizers only (no transformer, VAE or scheduler), so they are the stock pipeline's exactly: both CLIP
encoders' penultimate hidden states concatenated and zero-padded to T5's width, followed by T5's
hidden states of :data:`T5_LENGTH` tokens (the pipeline's default ``max_sequence_length``); pooled:
both CLIP projections concatenated. Encoded once and cached, as the other text families do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from difftune.backbones.fingerprint import model_fingerprint
from difftune.backbones.text import PromptEncoder, check_tokenizer_fits
from difftune.errors import UserError
from difftune.io.log_filters import dropping_messages

logger = logging.getLogger(__name__)

T5_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length
CLIP_LENGTH = 77  # CLIP's prompt length (the pipeline's default when it has no tokenizer)
PIPELINE_LOGGER = "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3"
TOKENIZER_LOGGER = "transformers.tokenization_utils_base"
TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


class SD3PromptEncoder:
    """Encode prompts as ``StableDiffusion3Pipeline.encode_prompt`` does, with its three frozen encoders.

    Args:
        pipeline: a ``StableDiffusion3Pipeline`` holding the text encoders and tokenizers (its
            transformer, VAE and scheduler may be ``None``).
        source: where they were loaded from (part of :meth:`identity`), or ``None``.
    """

    def __init__(self, pipeline: Any, source: str | None = None) -> None:
        self.pipeline = pipeline
        self.source = source
        for encoder in self.text_encoders:
            encoder.requires_grad_(False).eval()

    @property
    def text_encoders(self) -> list[Any]:
        """CLIP-L, CLIP-G and T5, in the pipeline's order."""
        pipe = self.pipeline
        return [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]

    @property
    def max_length(self) -> int:
        """Tokens per prompt read by the CLIP encoders (the first tokenizer's ``model_max_length``)."""
        return int(self.pipeline.tokenizer_max_length)

    @property
    def width(self) -> int:
        """Width D of a prompt-embedding token (T5's ``d_model``)."""
        return int(self.pipeline.text_encoder_3.config.d_model)

    @property
    def pooled_width(self) -> int:
        """Width of the pooled embedding (both CLIP projections)."""
        return sum(int(enc.config.projection_dim) for enc in self.text_encoders[:2])

    def parts(self) -> dict[str, Any]:
        """The text encoders and tokenizers by their pipeline names (what a saved pipeline needs)."""
        return {name: getattr(self.pipeline, name) for name in TEXT_PARTS}

    def count_truncated(self, prompts: Sequence[str]) -> int:
        """How many of ``prompts`` an encoder cuts short (CLIP at :attr:`max_length`, T5 at :data:`T5_LENGTH`)."""
        pipe = self.pipeline
        counts = [
            PromptEncoder(encoder, tokenizer).count_truncated(prompts)
            for encoder, tokenizer in (
                (pipe.text_encoder, pipe.tokenizer),
                (pipe.text_encoder_2, pipe.tokenizer_2),
            )
        ]
        unique = sorted(set(prompts))
        if unique:
            ids = pipe.tokenizer_3(unique, verbose=False).input_ids
            long = {prompt for prompt, tokens in zip(unique, ids, strict=True) if len(tokens) > T5_LENGTH}
            counts.append(sum(prompt in long for prompt in prompts))
        return max(counts)

    def warn_truncated(self, prompts: Sequence[str], what: str = "prompts") -> None:
        """Warn once, with the count, when some of ``prompts`` are longer than the encoders read."""
        count = self.count_truncated(prompts)
        if count:
            logger.warning(
                "%d of %d %s are longer than the text encoders' %d (CLIP) or %d (T5) tokens and are truncated",
                count,
                len(prompts),
                what,
                self.max_length,
                T5_LENGTH,
            )

    def identity(self) -> str:
        """A string that changes when encoding a prompt would give other embeddings."""
        if self.source is not None:
            return f"text-sd3:{self.source}:{self.max_length}:{T5_LENGTH}"
        prints = "-".join(model_fingerprint(encoder) for encoder in self.text_encoders)
        return f"text-sd3-weights-{prints}:{self.max_length}:{T5_LENGTH}"

    def to(self, device: torch.device | str) -> SD3PromptEncoder:
        """Move the text encoders to ``device``."""
        for encoder in self.text_encoders:
            encoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` (N) -> ``(embeddings (N, L, D), pooled (N, P))``, float32 on the CPU."""
        device = next(self.pipeline.text_encoder.parameters()).device
        hidden, pooled = [], []
        # difftune warns once with the count (warn_truncated); the pipeline and the tokenizers warn per call
        with (
            dropping_messages(PIPELINE_LOGGER, "The following part of your input was truncated"),
            dropping_messages(TOKENIZER_LOGGER, "Token indices sequence length is longer"),
        ):
            for start in range(0, len(prompts), batch_size):
                embeds, _, pool, _ = self.pipeline.encode_prompt(
                    prompt=list(prompts[start : start + batch_size]),
                    prompt_2=None,
                    prompt_3=None,
                    device=device,
                    do_classifier_free_guidance=False,
                    max_sequence_length=T5_LENGTH,
                )
                hidden.append(embeds.float().cpu())
                pooled.append(pool.float().cpu())
        if not hidden:
            return torch.zeros(0, self.max_length + T5_LENGTH, self.width), torch.zeros(0, self.pooled_width)
        return torch.cat(hidden), torch.cat(pooled)


def load_sd3_prompt_encoder(
    pipeline: str, components: dict[str, Any], revision: str | None, load: Any
) -> SD3PromptEncoder:
    """SD3's three text encoders and tokenizers of ``pipeline`` (``load``: safetensors-only ``from_pretrained``).

    Raises:
        UserError: the pipeline has no T5 encoder (``text_encoder_3``), which difftune does not drop.
    """
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    listed = components.get("text_encoder_3", ["", ""])
    if isinstance(listed, list) and listed[0] is None:
        raise UserError(
            f"{pipeline} has no T5 text encoder (text_encoder_3 is null); difftune trains SD3 with all three "
            "encoders: give a pipeline with text_encoder_3/ and tokenizer_3/"
        )
    parts: dict[str, Any] = {}
    for suffix, model_cls, tokenizer_cls in (
        ("", CLIPTextModelWithProjection, CLIPTokenizer),
        ("_2", CLIPTextModelWithProjection, CLIPTokenizer),
        ("_3", T5EncoderModel, T5TokenizerFast),
    ):
        tokenizer = tokenizer_cls.from_pretrained(pipeline, subfolder=f"tokenizer{suffix}", revision=revision)
        encoder = load(model_cls, pipeline, f"text_encoder{suffix}", revision)
        check_tokenizer_fits(tokenizer, encoder, pipeline)
        parts.update({f"tokenizer{suffix}": tokenizer, f"text_encoder{suffix}": encoder})
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **parts)
    return SD3PromptEncoder(pipe, pipeline)
