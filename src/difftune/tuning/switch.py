"""Switching a tuning method off: the pre-trained function, exactly, from the same model object.

Every piece a method adds is a :class:`Switchable` (or a peft adapter layer). Inside
:func:`adapters_off` each of them is an exact identity, so the model computes the pre-trained
outputs bit for bit without a second copy of its weights: the distillation teacher, and the
reference of the forgetting probes, at no memory cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


class Switchable(nn.Module):
    """A module a tuning method adds; with ``enabled`` false it leaves its input exactly as it is.

    ``reparametrises``: it only rewrites an existing tensor (so merging reads the tensor's value),
    rather than adding a module a stock model does not have.
    """

    enabled: bool = True
    reparametrises: bool = False


def _peft_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer  # imported when used: ``difftune --help`` stays fast

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def can_switch_off(model: nn.Module) -> bool:
    """``model`` holds pieces a tuning method added (so :func:`adapters_off` gives the pre-trained function)."""
    return any(isinstance(m, Switchable) for m in model.modules()) or bool(_peft_layers(model))


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes the pre-trained function (every added piece bypassed).

    Trainable flags are left as they were on exit (peft's switch clears them), so the optimiser and
    the EMA see the same parameters before and after.
    """
    pieces = [m for m in model.modules() if isinstance(m, Switchable)]
    before = [m.enabled for m in pieces]
    layers = _peft_layers(model)
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for m in pieces:
            m.enabled = False
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for m, state in zip(pieces, before, strict=True):
            m.enabled = state
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)
