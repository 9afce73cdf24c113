"""The interface of a tuning method."""

from __future__ import annotations

from typing import Protocol

from torch import nn


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``model`` with ``requires_grad``, in ``model.parameters()`` order.

    The order is the contract between the optimizer, the EMA's shadow copies and saving: all three
    list the trainable parameters this way.
    """
    return [p for p in model.parameters() if p.requires_grad]


class TuningMethod(Protocol):
    """Prepares a model for training and says what trains.

    Attributes:
        adapter: the method adds or reparametrises weights, which are saved alone as an adapter
            (and can be switched off); ``False``: it trains the model's own weights, saved whole.
    """

    adapter: bool

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        """Modify ``model`` in place (freeze, inject adapters, ...) and return its trainable parameters.

        The returned list must equal :func:`trainable_parameters` of the prepared model.
        """
        ...
