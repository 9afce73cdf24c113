"""Full fine-tuning: every parameter that the loaded model leaves trainable trains."""

from __future__ import annotations

from torch import nn

from difftune.tuning.base import trainable_parameters


class FullTuning:
    """All parameters with ``requires_grad`` train; nothing is frozen or added."""

    adapter = False

    def __init__(self, settings: object = None) -> None:
        self.settings = settings

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        """Leave ``model`` as it is; return its trainable parameters."""
        return trainable_parameters(model)
