"""Timestep schedules: one object gives the weight table, samples t and returns loss weights.

A schedule is a non-negative function over normalised time (docs/method.md §4), tabulated over the
T discrete timesteps and normalised to a probability p(t). Both realisations of Diff-Tuning's
weighting come from the same table:

* ``sample``: draw t ~ p(t) and weight every sample by 1 (the authors' code);
* ``weight``: draw t uniformly and multiply the loss by ``T * p(t)``.

Both have the same expected loss: E_{t~p}[L(t)] = E_{t~U}[T p(t) L(t)].
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from difftune.errors import UserError


class TimestepSchedule:
    """A probability table over integer timesteps 0..T-1 (t = 0 is the least noisy step).

    Args:
        density: non-negative function of normalised time ``u`` in (0, 1], vectorised over a
            float64 tensor of shape (T,), returning unnormalised weights of shape (T,).
        num_timesteps: T.
        reverse_time: evaluate ``density`` at u = (T - t) / T instead of u = (t + 1) / T, so that a
            density that grows with u puts its mass on the low-noise end.
        name: a readable name for logs and errors.
    """

    def __init__(
        self,
        density: Callable[[torch.Tensor], torch.Tensor],
        num_timesteps: int,
        reverse_time: bool = False,
        name: str = "custom",
    ) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps={num_timesteps} must be >= 1")
        t = torch.arange(num_timesteps, dtype=torch.float64)
        u = (num_timesteps - t) / num_timesteps if reverse_time else (t + 1) / num_timesteps
        raw = torch.as_tensor(density(u), dtype=torch.float64)
        if raw.shape != (num_timesteps,):
            raise UserError(
                f"schedule {name!r}: density returned shape {tuple(raw.shape)}, expected ({num_timesteps},)"
            )
        if not torch.isfinite(raw).all() or (raw < 0).any() or raw.sum() <= 0:
            raise UserError(f"schedule {name!r}: density must be finite, non-negative and not all zero")
        self.name = name
        self.num_timesteps = num_timesteps
        self._probs = raw / raw.sum()  # (T,) float64
        self._weights_on: dict[torch.device, torch.Tensor] = {}  # float32 weight tables per device

    def probs(self) -> torch.Tensor:
        """p(t), shape (T,), float64, sums to 1."""
        return self._probs.clone()

    def weights(self) -> torch.Tensor:
        """Importance weights ``T * p(t)``, shape (T,), float64, mean 1 (all ones for uniform)."""
        return self._probs * self.num_timesteps

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` timesteps t ~ p(t); returns a LongTensor of shape (n,) on the CPU."""
        if n == 0:
            return torch.empty(0, dtype=torch.long)
        return torch.multinomial(self._probs, n, replacement=True, generator=generator)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """``T * p(t)`` for each timestep in ``t`` (any shape), float32, on ``t``'s device."""
        table = self._weights_on.get(t.device)
        if table is None:
            table = self._weights_on[t.device] = self.weights().to(device=t.device, dtype=torch.float32)
        return table[t.long()]

    def __repr__(self) -> str:
        return f"TimestepSchedule({self.name!r}, T={self.num_timesteps})"


def uniform(num_timesteps: int, exponent: float = 0.0) -> TimestepSchedule:
    """Uniform t: standard fine-tuning. ``exponent`` is accepted and ignored."""
    return TimestepSchedule(lambda u: torch.ones_like(u), num_timesteps, name="uniform")


def power_up(num_timesteps: int, exponent: float = 1.0) -> TimestepSchedule:
    """Reconsolidation psi: p(t) proportional to (t + 1)^s, mass toward high noise (docs/method.md §2)."""
    return TimestepSchedule(lambda u: u**exponent, num_timesteps, name=f"power_up(s={exponent:g})")


def power_down(num_timesteps: int, exponent: float = 1.0) -> TimestepSchedule:
    """Retention xi: p(t) proportional to (T - t)^s, mass toward low noise (docs/method.md §2)."""
    return TimestepSchedule(
        lambda u: u**exponent, num_timesteps, reverse_time=True, name=f"power_down(s={exponent:g})"
    )


SCHEDULES: dict[str, Callable[[int, float], TimestepSchedule]] = {
    "uniform": uniform,
    "power_up": power_up,
    "power_down": power_down,
}


def _import_density(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"schedule {spec!r}: cannot import {attr!r} from {module_name!r} ({err})") from None


def build_schedule(name: str, num_timesteps: int, exponent: float = 1.0) -> TimestepSchedule:
    """Build a schedule by registry name, or from ``"package.module:function"`` (a density over u).

    Raises:
        ValueError: unknown name; the message lists the valid names.
    """
    if ":" in name:
        return TimestepSchedule(_import_density(name), num_timesteps, name=name)
    if name not in SCHEDULES:
        raise UserError(
            f"unknown schedule {name!r}; valid names: {sorted(SCHEDULES)} or 'package.module:function'"
        )
    return SCHEDULES[name](num_timesteps, exponent)
