"""Reparametrisations of existing weights that leave them exactly as they were when switched off.

Each is registered with :func:`torch.nn.utils.parametrize.register_parametrization`: the original
tensor stays in the model, frozen, and the module sees ``f(original)``. Merging is reading the
parametrised value (:func:`difftune.tuning.merge.merged_model`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from difftune.tuning.switch import Switchable


class AdditiveDelta(Switchable):
    """``original + delta``, with ``delta`` trainable and zero at the start (BitFit, DiffFit)."""

    reparametrises = True

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(like))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original + self.delta if self.enabled else original


class RowScale(Switchable):
    """``gamma * original`` along the first dimension (a layer's outputs), ``gamma`` shared and one at the start.

    DiffFit's scale factor on a residual branch, put on the branch's last layer (its weight and its
    bias share one ``gamma``), so that merging it is a plain reparametrised read.
    """

    reparametrises = True

    def __init__(self, gamma: nn.Parameter) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return original
        return original * self.gamma.view(-1, *([1] * (original.dim() - 1)))


class SpectralShift(Switchable):
    """SVDiff: ``U diag(relu(s + delta)) Vᵀ`` written as ``W + U diag(relu(s + delta) - s) Vᵀ``.

    The second form is ``W`` itself, bit for bit, while ``delta`` is zero or the shift is off. The
    singular vectors are computed once from the pre-trained weight (float32) and kept as buffers.
    """

    reparametrises = True

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        matrix = weight.detach().float().reshape(weight.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        self.register_buffer("u", u)
        self.register_buffer("s", s)
        self.register_buffer("vh", vh)
        self.delta = nn.Parameter(torch.zeros_like(s))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return original
        change = torch.relu(self.s + self.delta) - self.s
        update = (self.u * change) @ self.vh
        return original + update.reshape(original.shape).to(original.dtype)


def reparametrize(module: nn.Module, name: str, piece: nn.Module) -> None:
    """Register ``piece`` on ``module.<name>``, whose original value stays frozen (a second piece on
    the same tensor applies after the first)."""
    if not parametrize.is_parametrized(module, name):
        getattr(module, name).requires_grad_(False)
    parametrize.register_parametrization(module, name, piece)
