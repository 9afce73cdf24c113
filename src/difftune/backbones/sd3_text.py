"""Prompts to the embeddings of Stable Diffusion 3's and Flux's text encoders, with the stock pipelines'
own ``encode_prompt``.

SD3 conditions on three frozen text encoders (CLIP-L, CLIP-G and T5-XXL), Flux.1 on two (CLIP-L and
T5-XXL). The embeddings are built by the pipeline's ``encode_prompt`` itself, on a pipeline made of the
text encoders and tokenizers only (no transformer, VAE or scheduler), so they are the stock pipeline's
exactly:

* SD3 (:class:`SD3PromptEncoder`): both CLIP encoders' penultimate hidden states concatenated and
  zero-padded to T5's width, followed by T5's hidden states of :data:`T5_LENGTH` tokens (the pipeline's
  default ``max_sequence_length``); pooled: both CLIP projections concatenated.
* Flux (:class:`FluxPromptEncoder`): T5's hidden states of :data:`FLUX_T5_LENGTH` tokens
  (``FluxPipeline``'s default ``max_sequence_length``); pooled: CLIP-L's pooled output.

Encoded once and cached, as the other text families do.
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
FLUX_T5_LENGTH = 512  # FluxPipeline's default max_sequence_length
CLIP_LENGTH = 77  # CLIP's prompt length (the pipeline's default when it has no tokenizer)
PIPELINE_LOGGER = "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3"
FLUX_PIPELINE_LOGGER = "diffusers.pipelines.flux.pipeline_flux"
TOKENIZER_LOGGER = "transformers.tokenization_utils_base"


class T5PromptEncoder:
    """Encode prompts as a pipeline's ``encode_prompt`` does, with its frozen CLIP encoders and T5.

    Subclasses state the pipeline's text parts (:attr:`clip_parts`, :attr:`t5_part`), T5's length, the
    logger of the pipeline's truncation warnings and the name in :meth:`identity`, and call the
    pipeline's ``encode_prompt`` (:meth:`_encode`).

    Args:
        pipeline: a pipeline holding the text encoders and tokenizers (its transformer, VAE and
            scheduler may be ``None``).
        source: where they were loaded from (part of :meth:`identity`), or ``None``.
    """

    clip_parts: tuple[str, ...] = ()  # the CLIP encoders' suffixes ("" for text_encoder, "_2", ...)
    t5_part: str = ""  # T5's suffix
    t5_length: int = 0
    pipeline_logger: str = ""
    tag: str = ""

    def __init__(self, pipeline: Any, source: str | None = None) -> None:
        self.pipeline = pipeline
        self.source = source
        for encoder in self.text_encoders:
            encoder.requires_grad_(False).eval()

    @property
    def text_encoders(self) -> list[Any]:
        """The CLIP encoders then T5, in the pipeline's order."""
        return [
            getattr(self.pipeline, f"text_encoder{suffix}") for suffix in (*self.clip_parts, self.t5_part)
        ]

    @property
    def max_length(self) -> int:
        """Tokens per prompt read by the CLIP encoders (the first tokenizer's ``model_max_length``)."""
        return int(self.pipeline.tokenizer_max_length)

    @property
    def width(self) -> int:
        """Width D of a prompt-embedding token (T5's ``d_model``)."""
        return int(self.text_encoders[-1].config.d_model)

    @property
    def pooled_width(self) -> int:
        """Width of the pooled embedding."""
        raise NotImplementedError

    @property
    def length(self) -> int:
        """Tokens L of a prompt embedding."""
        raise NotImplementedError

    def parts(self) -> dict[str, Any]:
        """The text encoders and tokenizers by their pipeline names (what a saved pipeline needs)."""
        suffixes = (*self.clip_parts, self.t5_part)
        names = [f"{kind}{suffix}" for kind in ("text_encoder", "tokenizer") for suffix in suffixes]
        return {name: getattr(self.pipeline, name) for name in names}

    def count_truncated(self, prompts: Sequence[str]) -> int:
        """How many of ``prompts`` an encoder cuts short (CLIP at :attr:`max_length`, T5 at its length)."""
        pipe = self.pipeline
        counts = [
            PromptEncoder(
                getattr(pipe, f"text_encoder{suffix}"), getattr(pipe, f"tokenizer{suffix}")
            ).count_truncated(prompts)
            for suffix in self.clip_parts
        ]
        unique = sorted(set(prompts))
        if unique:
            ids = getattr(pipe, f"tokenizer{self.t5_part}")(unique, verbose=False).input_ids
            long = {
                prompt for prompt, tokens in zip(unique, ids, strict=True) if len(tokens) > self.t5_length
            }
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
                self.t5_length,
            )

    def identity(self) -> str:
        """A string that changes when encoding a prompt would give other embeddings."""
        if self.source is not None:
            return f"text-{self.tag}:{self.source}:{self.max_length}:{self.t5_length}"
        prints = "-".join(model_fingerprint(encoder) for encoder in self.text_encoders)
        return f"text-{self.tag}-weights-{prints}:{self.max_length}:{self.t5_length}"

    def to(self, device: torch.device | str) -> T5PromptEncoder:
        """Move the text encoders to ``device``."""
        for encoder in self.text_encoders:
            encoder.to(device)
        return self

    def _encode(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's ``encode_prompt`` of ``prompts``: ``(embeddings, pooled)``."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` (N) -> ``(embeddings (N, L, D), pooled (N, P))``, float32 on the CPU."""
        device = next(self.text_encoders[0].parameters()).device
        hidden, pooled = [], []
        # difftune warns once with the count (warn_truncated); the pipeline and the tokenizers warn per call
        with (
            dropping_messages(self.pipeline_logger, "The following part of your input was truncated"),
            dropping_messages(TOKENIZER_LOGGER, "Token indices sequence length is longer"),
        ):
            for start in range(0, len(prompts), batch_size):
                embeds, pool = self._encode(list(prompts[start : start + batch_size]), device)
                hidden.append(embeds.float().cpu())
                pooled.append(pool.float().cpu())
        if not hidden:
            return torch.zeros(0, self.length, self.width), torch.zeros(0, self.pooled_width)
        return torch.cat(hidden), torch.cat(pooled)


class SD3PromptEncoder(T5PromptEncoder):
    """Encode prompts as ``StableDiffusion3Pipeline.encode_prompt`` does, with its three frozen encoders."""

    clip_parts = ("", "_2")
    t5_part = "_3"
    t5_length = T5_LENGTH
    pipeline_logger = PIPELINE_LOGGER
    tag = "sd3"

    @property
    def pooled_width(self) -> int:
        """Width of the pooled embedding (both CLIP projections)."""
        return sum(int(enc.config.projection_dim) for enc in self.text_encoders[:2])

    @property
    def length(self) -> int:
        return self.max_length + T5_LENGTH

    def _encode(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=T5_LENGTH,
        )
        return embeds, pooled


class FluxPromptEncoder(T5PromptEncoder):
    """Encode prompts as ``FluxPipeline.encode_prompt`` does, with CLIP-L (pooled) and T5 (sequence)."""

    clip_parts = ("",)
    t5_part = "_2"
    t5_length = FLUX_T5_LENGTH
    pipeline_logger = FLUX_PIPELINE_LOGGER
    tag = "flux"

    @property
    def pooled_width(self) -> int:
        """Width of the pooled embedding (CLIP-L's hidden size: its pooled output)."""
        return int(self.pipeline.text_encoder.config.hidden_size)

    @property
    def length(self) -> int:
        return FLUX_T5_LENGTH

    def _encode(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=FLUX_T5_LENGTH
        )
        return embeds, pooled


def _text_pipeline(
    pipeline: str, revision: str | None, load: Any, suffixes: dict[str, tuple[Any, Any]]
) -> dict[str, Any]:
    """The text encoders and tokenizers of ``pipeline``: ``suffixes`` maps each suffix to its
    ``(model class, tokenizer class)``."""
    parts: dict[str, Any] = {}
    for suffix, (model_cls, tokenizer_cls) in suffixes.items():
        tokenizer = tokenizer_cls.from_pretrained(pipeline, subfolder=f"tokenizer{suffix}", revision=revision)
        encoder = load(model_cls, pipeline, f"text_encoder{suffix}", revision)
        check_tokenizer_fits(tokenizer, encoder, pipeline)
        parts.update({f"tokenizer{suffix}": tokenizer, f"text_encoder{suffix}": encoder})
    return parts


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
    clip = (CLIPTextModelWithProjection, CLIPTokenizer)
    parts = _text_pipeline(
        pipeline, revision, load, {"": clip, "_2": clip, "_3": (T5EncoderModel, T5TokenizerFast)}
    )
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **parts)
    return SD3PromptEncoder(pipe, pipeline)


def load_flux_prompt_encoder(pipeline: str, revision: str | None, load: Any) -> FluxPromptEncoder:
    """Flux's CLIP-L and T5 encoders and tokenizers of ``pipeline`` (``load``: safetensors-only
    ``from_pretrained``)."""
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    parts = _text_pipeline(
        pipeline,
        revision,
        load,
        {"": (CLIPTextModel, CLIPTokenizer), "_2": (T5EncoderModel, T5TokenizerFast)},
    )
    pipe = FluxPipeline(transformer=None, scheduler=None, vae=None, **parts)
    return FluxPromptEncoder(pipe, pipeline)
