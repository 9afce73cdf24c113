"""Non-finite losses, caught before they reach a checkpoint, without a host synchronisation per step.

Every micro-batch's per-sample losses are checked on the device; the first step with a NaN or an
infinity is remembered there, with the streams and quarters of t of the samples that went bad.
The host reads it only where the loop synchronises anyway: when it logs, and before it writes a
checkpoint. Two policies (``train.on_non_finite``):

- ``stop``: the run stops at that sync point. No checkpoint (and no ``final/``) is ever written from
  the weights of a non-finite step on; the last good checkpoint stays where it was.
- ``skip``: a step whose gradients (or any process's loss) are not finite leaves the weights and the
  optimiser state untouched. The decision stays on the device: a fused AdamW reads it as its
  ``found_inf`` flag (the flag ``torch.amp.GradScaler`` uses), so nothing waits for the host. The
  EMA still averages in the (unchanged) weights. The run stops once more than
  ``train.max_non_finite_steps`` steps were skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from difftune.errors import UserError
from difftune.objectives.base import LossTerms
from difftune.objectives.term_log import STREAMS

logger = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message gives the step, the streams and the range of t."""


class NonFiniteGuard:
    """Remembers, on the device, the first step whose loss was not finite, and counts skipped steps.

    Args:
        num_timesteps: T, to map t to its quarter.
        policy: ``"stop"`` or ``"skip"`` (see the module docstring).
        max_skipped: skipped steps tolerated by ``"skip"`` before the run stops.
    """

    def __init__(self, num_timesteps: int, policy: str = "stop", max_skipped: int = 0) -> None:
        self.T = num_timesteps
        self.policy = policy
        self.max_skipped = max_skipped
        self.first_step: torch.Tensor | None = None  # () int64, -1 while every loss was finite
        self.cells: torch.Tensor | None = None  # (stream * 4 + quarter,) non-finite samples at that step
        self.step_bad: torch.Tensor | None = None  # () bool: this step's micro-batches saw a bad loss
        self.skipped: torch.Tensor | None = None  # () int64: steps skipped so far
        self.reported = 0  # skipped steps already warned about

    def _start(self, device: torch.device) -> None:
        if self.first_step is None:
            self.first_step = torch.full((), -1, dtype=torch.long, device=device)
            self.cells = torch.zeros(2 * 4, dtype=torch.float64, device=device)
            self.step_bad = torch.zeros((), dtype=torch.bool, device=device)
            self.skipped = torch.zeros((), dtype=torch.long, device=device)

    def observe(self, step: int, terms: LossTerms) -> None:
        """Check one micro-batch of ``step`` (device operations only)."""
        device = terms.loss.device
        self._start(device)
        bad = ~torch.isfinite(terms.loss.detach())
        cell = terms.is_bank.long() * 4 + (terms.t * 4 // self.T).clamp(max=3)
        here = torch.zeros_like(self.cells).index_add_(0, cell, bad.double())
        self.step_bad |= bad.any()
        first = (self.first_step < 0) & (here.sum() > 0)
        self.first_step = torch.where(first, torch.full_like(self.first_step, step), self.first_step)
        self.cells += here * (self.first_step == step)

    def skip_flag(
        self,
        step: int,
        params: Sequence[torch.Tensor],
        accelerator: Any,
        grad_norm: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """For ``"skip"``: 1.0 on the device when this step must leave the weights alone, else 0.0.

        Call it after the last backward of ``step`` and before the optimiser step; ``grad_norm`` is
        the total gradient norm when gradient clipping has computed it already. The flag is the same
        on every process (gradients are already averaged; the loss flags are summed), so every
        replica skips together. Returns ``None`` under ``"stop"``.
        """
        if self.policy != "skip":
            return None
        grads = [p.grad for p in params if p.grad is not None]
        device = grads[0].device if grads else accelerator.device
        self._start(device)
        bad = self.step_bad.clone()
        if grad_norm is None and grads:
            grad_norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(grad_norm, DTensor):  # FSDP: the norm of the shards, summed over processes
            grad_norm = grad_norm.full_tensor()
        if grad_norm is not None:
            bad |= ~torch.isfinite(grad_norm.to(device))
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad.float(), reduction="sum") > 0
        self.first_step = torch.where(
            bad & (self.first_step < 0), torch.full_like(self.first_step, step), self.first_step
        )
        self.skipped += bad.long()
        self.step_bad.zero_()
        return bad.float()

    def check(self, accelerator: Any, last_good: str) -> None:
        """Synchronise; stop the run if a process saw a non-finite loss (more than allowed, for ``"skip"``).

        Args:
            accelerator: the run's accelerator (the first bad step is gathered over its processes).
            last_good: where the last good weights are, for the message.

        Raises:
            TrainingDiverged: with the step, the streams and the ranges of t that went bad.
        """
        if self.first_step is None:
            return
        packed = torch.cat([self.first_step.double().view(1), self.skipped.double().view(1), self.cells])
        rows = (
            accelerator.gather(packed.view(1, -1)).view(-1, packed.numel()).cpu()
            if accelerator.num_processes > 1
            else packed.view(1, -1).cpu()
        )
        bad_rows = rows[rows[:, 0] >= 0]
        if bad_rows.numel() == 0:
            return
        step = int(bad_rows[:, 0].min())
        cells = bad_rows[bad_rows[:, 0] == step, 2:].sum(0).view(2, 4)
        where = (
            ", ".join(
                f"{STREAMS[s]} t {q * self.T // 4}-{(q + 1) * self.T // 4 - 1}"
                for s in range(2)
                for q in range(4)
                if cells[s, q] > 0
            )
            or "non-finite gradients"
        )
        if self.policy == "stop":
            raise TrainingDiverged(
                f"the loss became non-finite at step {step + 1} ({where}); the run stopped and the last "
                f"good weights are {last_good}; lower train.learning_rate or set train.max_grad_norm, "
                "then resume"
            )
        skipped = int(rows[0, 1])  # the same on every process
        if skipped > self.max_skipped:
            raise TrainingDiverged(
                f"{skipped} steps had a non-finite loss (the first at step {step + 1}: {where}), more than "
                f"train.max_non_finite_steps={self.max_skipped}; the run stopped and the last good weights "
                f"are {last_good}; lower train.learning_rate or set train.max_grad_norm, then resume"
            )
        if skipped > self.reported:
            logger.warning(
                "skipped %d step(s) with a non-finite loss so far (the first at step %d: %s); the run "
                "stops after train.max_non_finite_steps=%d",
                skipped,
                step + 1,
                where,
                self.max_skipped,
            )
            self.reported = skipped
