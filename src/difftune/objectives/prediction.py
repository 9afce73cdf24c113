"""What a model's output predicts (the scheduler's ``prediction_type``), in one table.

For each parameterisation: the regression target given (x0, noise, t), and the x0 estimate implied
by a prediction at x_t (used by the variational-bound term and by analysis code).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from difftune.errors import UserError

if TYPE_CHECKING:
    from diffusers import DDPMScheduler


class _Rule(NamedTuple):
    target: Callable[[DDPMScheduler, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    x0: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (prediction, x_t, abar) -> x0


_RULES = {
    "epsilon": _Rule(
        target=lambda scheduler, x0, noise, t: noise,
        x0=lambda pred, x_t, abar: (x_t - (1 - abar).sqrt() * pred) / abar.sqrt(),
    ),
    "v_prediction": _Rule(
        target=lambda scheduler, x0, noise, t: scheduler.get_velocity(x0, noise, t),
        x0=lambda pred, x_t, abar: abar.sqrt() * x_t - (1 - abar).sqrt() * pred,
    ),
    "sample": _Rule(target=lambda scheduler, x0, noise, t: x0, x0=lambda pred, x_t, abar: pred),
}


class Parameterisation:
    """The prediction type of a DDPM noise schedule.

    Args:
        scheduler: carries ``config.prediction_type`` and ``alphas_cumprod``.

    Raises:
        ValueError: a prediction type other than ``epsilon``, ``v_prediction`` or ``sample``.
    """

    def __init__(self, scheduler: DDPMScheduler) -> None:
        kind = scheduler.config.prediction_type
        if kind not in _RULES:
            raise UserError(f"prediction_type {kind!r} is not supported; valid: {sorted(_RULES)}")
        self.kind = kind
        self.scheduler = scheduler
        self._rule = _RULES[kind]
        self._abar = scheduler.alphas_cumprod.float()

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model should output for x_t = add_noise(x0, noise, t); all (N, C, H, W) but t (N,)."""
        return self._rule.target(self.scheduler, x0, noise, t)

    def x0(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0 estimate (N, C, H, W) implied by ``prediction`` at ``x_t`` and timesteps ``t`` (N,)."""
        if self._abar.device != t.device:
            self._abar = self._abar.to(t.device)
        abar = self._abar[t].view(-1, *([1] * (x_t.ndim - 1)))
        return self._rule.x0(prediction, x_t, abar)
