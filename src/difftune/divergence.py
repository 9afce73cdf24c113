"""Non-finite losses, caught before they reach a checkpoint, without a host synchronisation per step.

Every micro-batch's per-sample losses are checked on the device; the first step with a NaN or an
infinity is remembered there, with the streams and quarters of t of the samples that went bad.
The host reads it only where the loop synchronises anyway: when it logs, and before it writes a
checkpoint. So no checkpoint (and no ``final/``) is ever written from non-finite weights, the last
good checkpoint stays where it was, and the run stops with a message that says where it went bad.
"""

from __future__ import annotations

from typing import Any

import torch

from difftune.errors import UserError
from difftune.objectives.base import LossTerms
from difftune.objectives.term_log import STREAMS


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message gives the step, the streams and the range of t."""


class NonFiniteGuard:
    """Remembers, on the device, the first step whose loss was not finite.

    Args:
        num_timesteps: T, to map t to its quarter.
    """

    def __init__(self, num_timesteps: int) -> None:
        self.T = num_timesteps
        self.first_step: torch.Tensor | None = None  # () int64, -1 while every loss was finite
        self.cells: torch.Tensor | None = None  # (stream * 4 + quarter,) non-finite samples at that step

    def observe(self, step: int, terms: LossTerms) -> None:
        """Check one micro-batch of ``step`` (device operations only)."""
        device = terms.loss.device
        if self.first_step is None:
            self.first_step = torch.full((), -1, dtype=torch.long, device=device)
            self.cells = torch.zeros(2 * 4, dtype=torch.float64, device=device)
        bad = ~torch.isfinite(terms.loss.detach())
        cell = terms.is_bank.long() * 4 + (terms.t * 4 // self.T).clamp(max=3)
        here = torch.zeros_like(self.cells).index_add_(0, cell, bad.double())
        first = (self.first_step < 0) & (here.sum() > 0)
        self.first_step = torch.where(first, torch.full_like(self.first_step, step), self.first_step)
        self.cells += here * (self.first_step == step)

    def check(self, accelerator: Any, last_good: str) -> None:
        """Synchronise and stop the run if any process saw a non-finite loss.

        Args:
            accelerator: the run's accelerator (the first bad step is gathered over its processes).
            last_good: where the last good weights are, for the message.

        Raises:
            TrainingDiverged: with the step, the streams and the ranges of t that went bad.
        """
        if self.first_step is None:
            return
        packed = torch.cat([self.first_step.double().view(1), self.cells])
        rows = (
            accelerator.gather(packed.view(1, -1)).view(-1, packed.numel()).cpu()
            if accelerator.num_processes > 1
            else packed.view(1, -1).cpu()
        )
        bad_rows = rows[rows[:, 0] >= 0]
        if bad_rows.numel() == 0:
            return
        step = int(bad_rows[:, 0].min())
        cells = bad_rows[bad_rows[:, 0] == step, 1:].sum(0).view(2, 4)
        where = [
            f"{STREAMS[s]} t {q * self.T // 4}-{(q + 1) * self.T // 4 - 1}"
            for s in range(2)
            for q in range(4)
            if cells[s, q] > 0
        ]
        raise TrainingDiverged(
            f"the loss became non-finite at step {step + 1} ({', '.join(where)}); the run stopped and the last "
            f"good weights are {last_good}; lower train.learning_rate or set train.max_grad_norm, then resume"
        )
