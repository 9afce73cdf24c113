"""DDPM (Ho et al. 2020) with the model's own β schedule: ε, v or x0 prediction, and a variational
bound for models that learn their variance. The index is the scheduler's timestep itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from difftune.errors import UserError
from difftune.process.base import ForwardProcess, per_sample


class _Rule(NamedTuple):
    # (x0, noise, sqrt(abar), sqrt(1 - abar)) -> the regression target
    target: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    # (prediction, x_t, sqrt(abar), sqrt(1 - abar)) -> x0
    x0: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


PREDICTIONS = {
    "epsilon": _Rule(target=lambda x0, noise, a, s: noise, x0=lambda pred, x_t, a, s: (x_t - s * pred) / a),
    "v_prediction": _Rule(
        target=lambda x0, noise, a, s: a * noise - s * x0, x0=lambda pred, x_t, a, s: a * x_t - s * pred
    ),
    "sample": _Rule(target=lambda x0, noise, a, s: x0, x0=lambda pred, x_t, a, s: pred),
}


# the loss of a prediction type, times this, is the x0 (clean-sample) loss ||x0 - x0_hat||^2 (docs/method.md §8)
X0_FACTOR: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "epsilon": lambda snr: 1.0 / snr,
    "v_prediction": lambda snr: 1.0 / (snr + 1.0),
    "sample": lambda snr: torch.ones_like(snr),
}


class DDPMProcess(ForwardProcess):
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, computed by diffusers' ``DDPMScheduler.add_noise``.

    Args:
        scheduler_config: the model's scheduler config (any class of the DDPM family: β schedule,
            ``num_train_timesteps``, ``prediction_type``).

    Raises:
        UserError: a prediction type other than ``epsilon``, ``v_prediction`` or ``sample``.
    """

    name = "ddpm"
    has_variance_term = True

    def __init__(self, scheduler_config: dict[str, Any]) -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        kind = self.scheduler.config.prediction_type
        if kind not in PREDICTIONS:
            raise UserError(f"prediction_type {kind!r} is not supported; valid: {sorted(PREDICTIONS)}")
        self.prediction_type = kind
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod  # ᾱ_t, (T,) float32
        self.betas = self.scheduler.betas
        self._rule = PREDICTIONS[kind]

    def _scales(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = per_sample(self.alphas_cumprod.float(), t, like)
        return abar.sqrt(), (1 - abar).sqrt()

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_t, t

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":  # diffusers' own formula, for bit-identical targets
            return self.scheduler.get_velocity(x0, noise, t)
        return self._rule.target(x0, noise, *self._scales(t, x0))

    def x0(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._rule.x0(prediction, x_t, *self._scales(t, x_t))

    def equivalent_alphas_cumprod(self) -> torch.Tensor:
        return self.alphas_cumprod  # its own table, exactly

    def snr(self) -> torch.Tensor:
        abar = self.alphas_cumprod.double()
        return abar / (1 - abar)

    def log_snr(self) -> torch.Tensor:
        return self.snr().log()

    def x0_factor(self) -> torch.Tensor:
        return X0_FACTOR[self.prediction_type](self.snr())
