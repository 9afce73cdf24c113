"""Visual prompt tuning (deep): learned tokens prepended to the input of every transformer block.

Each block sees its own ``P`` prompt tokens in front of the image tokens; its output for them is
dropped, so the next block gets fresh prompts and the model's output keeps its shape. Switched
off, the hooks pass the tokens through untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difftune.tuning.base import AdapterMethod
from difftune.tuning.switch import Switchable
from difftune.tuning.targets import require, transformer_blocks


class DeepPrompts(Switchable):
    """``tokens`` prompt tokens of width ``width`` for one block (initialised as in VPT: uniform Xavier)."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        bound = (6.0 / (tokens + width)) ** 0.5
        self.tokens = nn.Parameter(torch.empty(tokens, width).uniform_(-bound, bound))

    def attach(self, block: nn.Module) -> None:
        """Become ``block.vpt``: prepend the prompts to its input, drop them from its output."""
        block.vpt = self
        block.register_forward_pre_hook(_prepend)
        block.register_forward_hook(_drop)


def _prepend(block: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    prompts = block.vpt
    if not prompts.enabled:
        return None
    hidden = args[0]
    tokens = prompts.tokens.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
    return (torch.cat([tokens, hidden], dim=1), *args[1:])


def _drop(block: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    prompts = block.vpt
    return output[:, prompts.tokens.shape[0] :] if prompts.enabled else output


class VPTTuning(AdapterMethod):
    """Deep prompts per transformer block train; the model stays frozen."""

    def add(self, inner: nn.Module) -> None:
        for block in require(transformer_blocks(inner), "vpt", "transformer blocks", inner):
            query = block.attn1.to_q  # its input width is the block's token width
            prompts = DeepPrompts(self.settings.vpt.tokens, query.in_features)
            prompts.to(device=query.weight.device, dtype=query.weight.dtype).attach(block)
