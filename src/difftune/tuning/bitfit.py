"""BitFit: only the bias terms train (as zero-initialised additive deltas, so they switch off)."""

from __future__ import annotations

from torch import nn

from difftune.errors import UserError
from difftune.tuning.base import AdapterMethod
from difftune.tuning.reparam import AdditiveDelta, reparametrize


def add_bias_deltas(model: nn.Module) -> int:
    """Give every ``bias`` parameter of ``model`` a trainable delta; returns how many."""
    owners = [m for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)]
    for module in owners:
        reparametrize(module, "bias", AdditiveDelta(module.bias))
    return len(owners)


class BitFitTuning(AdapterMethod):
    """Every bias of the model trains; nothing else does."""

    def add(self, inner: nn.Module) -> None:
        if not add_bias_deltas(inner):
            raise UserError(f"tuning.method=bitfit: {type(inner).__name__} has no bias terms")
