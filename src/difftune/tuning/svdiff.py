"""SVDiff: learned shifts of the singular values of chosen weight matrices (convolutions reshaped)."""

from __future__ import annotations

from torch import nn

from difftune.errors import UserError
from difftune.tuning.base import AdapterMethod
from difftune.tuning.reparam import SpectralShift, reparametrize
from difftune.tuning.targets import default_targets, matches


class SVDiffTuning(AdapterMethod):
    """Spectral shifts of the target layers' weights train; the model stays frozen."""

    def add(self, inner: nn.Module) -> None:
        targets = self.settings.svdiff.targets or default_targets(
            inner, self.defaults, "svdiff", "svdiff.targets"
        )
        layers = [
            m
            for name, m in inner.named_modules()
            if matches(name, targets) and isinstance(m, (nn.Linear, nn.Conv2d))
        ]
        if not layers:
            raise UserError(
                f"tuning.method=svdiff: no linear or convolution layer of {type(inner).__name__} matches "
                f"tuning.svdiff.targets={targets}"
            )
        for layer in layers:
            reparametrize(layer, "weight", SpectralShift(layer.weight))
