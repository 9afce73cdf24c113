"""Check, on a run's first batch, that a ``torch.compile``-d backbone computes the gradients eager mode does.

A miscompiled backward is silent: the loss looks right and parts of the model never train. With
torch 2.13's inductor on a CPU, for one, a diffusers ``UpBlock2D`` at batch 16 returns zero
gradients for its inputs, so every block below it in a ``UNet2DModel`` stops learning while the
loss curve matches the eager run's. A compiled run therefore computes its first micro-batch's
gradients twice, once with the compiled code forced eager (``torch.compiler.set_stance``) and once
compiled, and refuses to go on when they disagree. Both passes run outside DDP's gradient
synchronisation and are cleared afterwards; the real step then runs as usual.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from difftune.errors import UserError

logger = logging.getLogger(__name__)

# the largest relative difference of all gradients together that is rounding, per compute precision
TOLERANCE = {"no": 1e-2, "bf16": 5e-2, "fp16": 5e-2}
# a parameter whose eager gradient is at least this share of the largest one must not lose it
VANISHED_SHARE = 1e-3


@dataclass(frozen=True)
class GradientAgreement:
    """How the compiled gradients compare with the eager ones."""

    relative_difference: float  # ||compiled - eager|| / ||eager|| over every gradient together
    vanished: list[str]  # parameters with a sizeable eager gradient and none when compiled

    def holds(self, tolerance: float) -> bool:
        return not self.vanished and self.relative_difference <= tolerance


def _take_gradients(params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads


def compare_gradients(
    names: Sequence[str], eager: Sequence[torch.Tensor], compiled: Sequence[torch.Tensor]
) -> GradientAgreement:
    """The agreement of two sets of gradients of the parameters ``names``."""
    eager_norms = [g.float().norm().item() for g in eager]
    apart = math.sqrt(
        sum((c.float() - e.float()).pow(2).sum().item() for e, c in zip(eager, compiled, strict=True))
    )
    total = math.sqrt(sum(n * n for n in eager_norms))
    largest = max(eager_norms, default=0.0)
    vanished = [
        name
        for name, norm, c in zip(names, eager_norms, compiled, strict=True)
        if norm > VANISHED_SHARE * largest > 0 and not c.any()
    ]
    return GradientAgreement(apart / total if total > 0 else apart, vanished)


def check_compiled_gradients(
    backward: Callable[[], None], named_params: Sequence[tuple[str, nn.Parameter]], mixed_precision: str
) -> GradientAgreement:
    """Run ``backward`` (one micro-batch's forward and backward) eagerly and compiled, and compare.

    Returns:
        the agreement, when it holds; the parameters' gradients are cleared either way.

    Raises:
        UserError: the compiled gradients differ from the eager ones beyond rounding.
    """
    names = [name for name, _ in named_params]
    params = [p for _, p in named_params]
    with torch.compiler.set_stance("force_eager"):
        backward()
    eager = _take_gradients(params)
    backward()
    agreement = compare_gradients(names, eager, _take_gradients(params))
    tolerance = TOLERANCE.get(mixed_precision, TOLERANCE["bf16"])
    if not agreement.holds(tolerance):
        lost = f"; no gradient reaches {len(agreement.vanished)} parameters, e.g. {agreement.vanished[0]}"
        raise UserError(
            f"train.compile: the compiled model's gradients differ from eager mode's on the first batch "
            f"(relative difference {agreement.relative_difference:.2g}{lost if agreement.vanished else ''}): "
            f"a torch.compile fault in torch {torch.__version__} for this model; use train.compile=no"
        )
    logger.info(
        "torch.compile: first-batch gradients match eager mode (relative difference %.2g)",
        agreement.relative_difference,
    )
    return agreement
