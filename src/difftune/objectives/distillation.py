"""Distillation-based retention (the paper's knowledge-distillation variant, docs/method.md §7).

Reconsolidation is Diff-Tuning's: the denoising loss on target samples with t ~ psi. Retention
becomes a distance to the pre-trained model instead of to the true noise: on the retention rows
(bank samples, or target samples with ``objective.retention_data: target``), noised at t ~ xi,

    distill = mean over elements of (f_theta(x_t, t, null) - f_pre(x_t, t, null))^2

over the model's whole output (the variance channels too, for a model that predicts them). The
teacher f_pre is the same model with its adapters switched off (no copy: parameter-efficient
methods), or a frozen copy taken before training (full fine-tuning), optionally in bfloat16.
It runs on the retention rows only, picked on the host from :attr:`Draw.bank`. With
``objective.distillation.teacher: stored`` there is no teacher: the bank holds its predictions at a
few (t, noise) draws per sample (:mod:`difftune.bank.teacher_draws`), passed in :attr:`Draw.reference`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from difftune.objectives.base import Draw, LossTerms
from difftune.objectives.diff_tuning import DiffTuningLoss
from difftune.tuning import adapters_off

if TYPE_CHECKING:
    from difftune.backbones.base import Backbone
    from difftune.backbones.conditioning import Conditioning

Teacher = Callable[[torch.Tensor, torch.Tensor, "Conditioning"], torch.Tensor]


def switched_off_teacher(backbone: Backbone) -> Teacher:
    """The pre-trained function of ``backbone`` itself: its tuning switched off for the call."""

    def teacher(x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        with adapters_off(backbone):
            return backbone(x_t, t, cond)

    return teacher


def frozen_copy(backbone: Backbone, dtype: torch.dtype = torch.float32) -> Backbone:
    """A frozen copy of ``backbone`` as it is now, in ``dtype``: taken from the pre-trained model before
    training, restoring a checkpoint or sharding change its weights."""
    return copy.deepcopy(backbone).to(dtype).eval().requires_grad_(False)


def frozen_copy_teacher(frozen: Backbone) -> Teacher:
    """The prediction of ``frozen`` (:func:`frozen_copy`), in its dtype, on the student's device."""
    first = next(frozen.parameters())
    dtype = first.dtype

    def teacher(x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if first.device != x_t.device:  # once: the copy follows the student to its device
            frozen.to(x_t.device)
        with torch.autocast(x_t.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return frozen(x_t.to(dtype), t, cond).float()

    return teacher


class DistillationLoss(DiffTuningLoss):
    """Diff-Tuning with retention by distillation from the pre-trained model.

    Args:
        *args, **kwargs: those of :class:`~difftune.objectives.DiffTuningLoss`.
        teacher: the pre-trained model's prediction ``(x_t, t, cond) -> output``, or ``None`` when
            every draw brings it stored (:attr:`Draw.reference`).
    """

    def __init__(self, *args: object, teacher: Teacher | None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher

    def __call__(
        self, model: nn.Module, x0: torch.Tensor, cond: Conditioning, is_bank: torch.Tensor, draw: Draw
    ) -> LossTerms:
        """Denoising terms on the target rows, ``distill`` on the retention rows (zero elsewhere)."""
        x_t, t, noise = self.noised(x0, draw)
        out = self.predict(model, x_t, t, cond)
        terms = self.denoising_terms(out, x0, x_t, noise, t)
        host_rows = draw.bank.nonzero().flatten()  # chosen on the host: no synchronisation
        rows = host_rows.to(x0.device)
        distill = torch.zeros(x0.shape[0], device=x0.device)
        if rows.numel():  # a micro-batch (or one process's share of it) may hold no retention row
            if draw.reference is not None:  # stored with the bank at this row's (t, noise)
                reference = draw.reference[host_rows].to(x0.device)
            elif self.teacher is None:
                raise ValueError(
                    "objective.distillation.teacher=stored, but the draw brings no stored prediction"
                )
            else:
                with torch.no_grad():
                    reference = self.predict(self.teacher, x_t[rows], t[rows], cond.select(rows))
            distance = (out[rows].float() - reference.float()).pow(2).flatten(1).mean(1)
            distill = distill.index_put((rows,), distance)
        zero = torch.zeros_like(distill)
        terms = {name: torch.where(is_bank, zero, value) for name, value in terms.items()}
        terms["distill"] = distill
        return self.weighted(terms, t, is_bank)
