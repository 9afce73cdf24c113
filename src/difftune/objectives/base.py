"""The objective protocol: draw the batch's randomness, compute per-sample terms, reduce them.

An objective is a small callable with its hyper-parameters in ``__init__`` (the NVlabs/edm
``loss.py`` style). It returns *unreduced* per-sample terms, named (``mse``, ``vb``, later
``distill``, ...), so the trainer can reduce them over processes and accumulation steps exactly and
log each term per stream and quarter of t without knowing which terms exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from difftune.backbones.conditioning import Conditioning


@dataclass
class Draw:
    """Everything random about one batch, drawn once for the global batch and sliced per process.

    Attributes:
        t: integer timesteps (N,).
        noise: Gaussian noise (N, C, H, W).
        drop: True where a target sample's condition is dropped for classifier-free guidance (N,)
            (always False for bank samples); the backbone's ``drop`` applies it.
        bank: True for the bank (retention) rows (N,), on the host, so an objective can pick those
            rows without a device synchronisation.
        reference: the pre-trained model's output at each bank row's (t, noise), stored in the bank
            (``objective.distillation.teacher: stored``), (N, C_out, H, W) with zeros on the target
            rows; ``None`` when the teacher is computed instead.
    """

    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor
    bank: torch.Tensor
    reference: torch.Tensor | None = None

    def __getitem__(self, index: torch.Tensor | slice) -> Draw:
        reference = None if self.reference is None else self.reference[index]
        return Draw(self.t[index], self.noise[index], self.drop[index], self.bank[index], reference)


@dataclass
class LossTerms:
    """Unreduced result of an objective. All tensors have shape (N,).

    Attributes:
        loss: per-sample loss to optimise (including any schedule weight).
        t: the timesteps used.
        is_bank: True for bank (retention) samples, False for target (reconsolidation) samples.
        terms: the unweighted per-sample terms by name (detached; for logging per range of t).
    """

    loss: torch.Tensor
    t: torch.Tensor
    is_bank: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def raw(self) -> torch.Tensor:
        """Sum of the unweighted terms, (N,)."""
        return sum(self.terms.values(), torch.zeros_like(self.loss)).detach()


class Objective(Protocol):
    """What the trainer needs of an objective.

    Attributes:
        bank_weight: lambda, the weight of the bank stream's mean in the reduced loss (for logging).
    """

    bank_weight: float

    def draw(self, n_target: int, n_bank: int, shape: tuple[int, ...], generator: torch.Generator) -> Draw:
        """Draw t, noise and the guidance drop for ``n_target`` target then ``n_bank`` bank samples."""
        ...

    def __call__(
        self, model: torch.nn.Module, x0: torch.Tensor, cond: Conditioning, is_bank: torch.Tensor, draw: Draw
    ) -> LossTerms:
        """Per-sample terms of one forward pass over clean samples ``x0`` (N, C, H, W) and their conditions."""
        ...

    def reduce(
        self, terms: LossTerms, n_target: int, n_bank: int, bank_weight: float | None = None
    ) -> torch.Tensor:
        """The scalar to back-propagate, normalised by the *global* stream counts of the step;
        ``bank_weight`` is the step's lambda (``None``: :attr:`bank_weight`)."""
        ...
