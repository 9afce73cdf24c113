"""The interface of a tuning method."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from torch import nn

if TYPE_CHECKING:
    from difftune.config.tuning import TuningConfig


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


class AdapterMethod:
    """Base of the parameter-efficient methods: the model is frozen, the method adds its pieces.

    A subclass implements :meth:`add`; what it adds (and only that) trains.

    Args:
        settings: the ``tuning`` config section.
    """

    adapter = True

    def __init__(self, settings: TuningConfig) -> None:
        self.settings = settings
        self.defaults: dict[str, list[str]] = {}  # the backbone's default target modules, by method

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        """Freeze ``model`` (a backbone), add the method's pieces to its diffusers model, return them.

        The default target modules are the backbone's (its family's ``adapter_targets``).
        """
        model.requires_grad_(False)
        self.defaults = dict(getattr(model, "adapter_targets", None) or {})
        self.add(model.inner)
        return trainable_parameters(model)

    def add(self, inner: nn.Module) -> None:
        """Add the method's trainable pieces to the frozen diffusers model ``inner``."""
        raise NotImplementedError
