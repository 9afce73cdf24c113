"""BitFit: only the bias terms train (as zero-initialised additive deltas, so they switch off)."""

from __future__ import annotations

from torch import nn

from difftune.errors import UserError
from difftune.tuning.base import trainable_parameters
from difftune.tuning.reparam import AdditiveDelta, reparametrize
from difftune.tuning.settings import TuningConfig


def add_bias_deltas(model: nn.Module) -> int:
    """Give every ``bias`` parameter of ``model`` a trainable delta; returns how many."""
    owners = [m for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)]
    for module in owners:
        reparametrize(module, "bias", AdditiveDelta(module.bias))
    return len(owners)


class BitFitTuning:
    """Every bias of the model trains; nothing else does."""

    adapter = True

    def __init__(self, settings: TuningConfig) -> None:
        self.settings = settings

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        model.requires_grad_(False)
        if not add_bias_deltas(model.inner):
            raise UserError(f"model.tuning=bitfit: {type(model.inner).__name__} has no bias terms")
        return trainable_parameters(model)
