"""Which parameters train: a tuning method prepares a model and names its trainable parameters.

``model.tuning`` in the config picks one by name from :data:`TUNING_METHODS`. The trainer calls
:func:`prepare_tuning` once and optimises (and keeps the EMA of) exactly the parameters it returns;
nothing else in the loop knows which method is used. A new method (LoRA, BitFit, ...) is a new
module here with a class that implements :class:`TuningMethod`, added to the registry.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from difftune.errors import UserError
from difftune.tuning.base import TuningMethod, trainable_parameters
from difftune.tuning.full import FullTuning

TUNING_METHODS: dict[str, Callable[[], TuningMethod]] = {
    "full": FullTuning,
}


def build_tuning(name: str) -> TuningMethod:
    """The tuning method registered as ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if name not in TUNING_METHODS:
        raise UserError(f"unknown tuning method {name!r}; valid: {sorted(TUNING_METHODS)}")
    return TUNING_METHODS[name]()


def prepare_tuning(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Prepare ``model`` for the tuning method ``name``; returns its trainable parameters in module order."""
    return build_tuning(name).prepare(model)


__all__ = [
    "TUNING_METHODS",
    "FullTuning",
    "TuningMethod",
    "build_tuning",
    "prepare_tuning",
    "trainable_parameters",
]
