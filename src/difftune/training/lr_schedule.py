"""The learning rate of each optimiser step (``train.lr_scheduler``, ``train.lr_warmup_steps``).

The curves are diffusers' (:func:`diffusers.optimization.get_scheduler`), read as a function of the
step: before optimiser step ``s`` (0-based) every parameter group's rate is set to
``learning_rate * factor(s)``. Nothing but the step is state, so a resumed run continues the same
curve without a scheduler state in its checkpoint, a run resumed with another ``max_steps`` follows
the curve of its new length, and a step the non-finite guard skips still advances the curve, as it
advances the step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.optimization import get_scheduler

from difftune.config.train import TrainConfig


class LearningRateSchedule:
    """``learning_rate * factor(step)`` for the run's ``train`` settings.

    Args:
        tc: the run's ``train`` section (``learning_rate``, ``lr_scheduler``, ``lr_warmup_steps``,
            ``lr_num_cycles``, ``lr_power``, ``max_steps``).
    """

    def __init__(self, tc: TrainConfig) -> None:
        self.base = tc.learning_rate
        self.factor = _factor(tc)

    def rate(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based)."""
        return self.base * self.factor(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group of ``optimizer`` to the rate of ``step``; returns it."""
        rate = self.rate(step)
        for group in optimizer.param_groups:
            group["lr"] = rate
        return rate


def _factor(tc: TrainConfig) -> Callable[[int], float]:
    """diffusers' multiplier of ``learning_rate`` at each step, for the run's schedule."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # get_scheduler needs an optimiser
    scheduler = get_scheduler(
        tc.lr_scheduler,
        probe,
        num_warmup_steps=tc.lr_warmup_steps,
        num_training_steps=tc.max_steps,
        num_cycles=tc.lr_num_cycles,
        power=tc.lr_power,
    )
    return scheduler.lr_lambdas[0]
