"""DiffFit: biases, norm parameters, class embeddings, and learnable scale factors on residual branches.

The scale factors (one per output channel, one at the start) multiply the attention and the
feed-forward branch of the chosen blocks (default: the first half, as the DiffFit authors do).
A block is a ``BasicTransformerBlock`` (DiT), or, in a backbone without those, an attention
module (the UNet's attention blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from difftune.errors import UserError
from difftune.tuning.base import AdapterMethod
from difftune.tuning.bitfit import add_bias_deltas
from difftune.tuning.reparam import AdditiveDelta, RowScale, reparametrize
from difftune.tuning.targets import attention_modules, feed_forward_modules, transformer_blocks

NORMS = (nn.LayerNorm, nn.GroupNorm)


def _branch_ends(block: nn.Module) -> list[nn.Linear]:
    """The last layers of the attention and feed-forward branches of ``block`` (an attention module
    is a branch of its own)."""
    attentions = attention_modules(block)  # includes ``block`` itself when it is one
    ends = [a.to_out[0] for a in attentions] + [f.net[-1] for f in feed_forward_modules(block)]
    return [e for e in ends if isinstance(e, nn.Linear)]


def add_scale_factors(model: nn.Module, blocks: list[int] | None) -> int:
    """Scale factors on the branch ends of the chosen blocks of ``model``; returns how many."""
    candidates = transformer_blocks(model) or attention_modules(model)
    if not candidates:
        raise UserError(f"tuning.method=difffit: {type(model).__name__} has no attention blocks to scale")
    chosen = list(range(len(candidates) // 2 or 1)) if blocks is None else blocks
    bad = [i for i in chosen if not 0 <= i < len(candidates)]
    if bad:
        raise UserError(
            f"tuning.difffit.blocks={blocks} names blocks {bad}, but the model has {len(candidates)} "
            f"(0-{len(candidates) - 1})"
        )
    count = 0
    for index in chosen:
        for end in _branch_ends(candidates[index]):
            gamma = nn.Parameter(
                torch.ones(end.out_features, dtype=end.weight.dtype, device=end.weight.device)
            )
            reparametrize(end, "weight", RowScale(gamma))
            if end.bias is not None:
                reparametrize(end, "bias", RowScale(gamma))
            count += 1
    return count


class DiffFitTuning(AdapterMethod):
    """DiffFit's parameters: biases, norms, class embeddings and scale factors (docs/method.md)."""

    def add(self, inner: nn.Module) -> None:
        add_bias_deltas(inner)
        add_scale_factors(inner, self.settings.difffit.blocks)  # after: it scales bias + delta
        for module in inner.modules():
            if isinstance(module, NORMS) and isinstance(module.weight, nn.Parameter):
                reparametrize(module, "weight", AdditiveDelta(module.weight))
            if isinstance(module, nn.Embedding):  # the class embeddings (DiT: one table per block)
                reparametrize(module, "weight", AdditiveDelta(module.weight))
