"""Timestep schedules: one object gives the weight table, samples t and returns loss weights.

A schedule is a non-negative function over normalised time (docs/method.md §4), tabulated over the
T discrete timesteps and normalised to a probability p(t). Both realisations of Diff-Tuning's
weighting come from the same table:

* ``sample``: draw t ~ p(t) and weight every sample by 1 (the authors' code);
* ``weight``: draw t uniformly and multiply the loss by ``T * p(t)``.

Both have the same expected loss: E_{t~p}[L(t)] = E_{t~U}[T p(t) L(t)].

Besides the power schedules of ψ and ξ over normalised time, two weightings that other methods use
on the target stream are schedules too, built from the model's noise levels (docs/method.md §8):
min-SNR-γ and inverse-SNR (x0 supervision). Like every schedule they are normalised to mean 1 over t.

A third kind is fitted from data before training (docs/method.md §10): ``data_driven`` is a table
of per-bin weights over t (:func:`tabulated`, piecewise constant over equal bins of t), measured from
the pre-trained model's transfer gap by :mod:`difftune.schedules.data_driven`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from difftune.config.names import schedule_names
from difftune.errors import UserError
from difftune.plugins import import_object
from difftune.process.base import NoiseLevels
from difftune.schedules import noise_level

__all__ = [
    "AXES",
    "FITTED_SCHEDULES",
    "NOISE_LEVEL_SCHEDULES",
    "SCHEDULES",
    "SNR_SCHEDULES",
    "NoiseLevels",
    "TimestepSchedule",
    "build_schedule",
    "inverse_snr",
    "logit_normal_down",
    "logit_normal_up",
    "min_snr",
    "on_log_snr",
    "power_down",
    "power_up",
    "pretraining",
    "tabulated",
    "timestep_bins",
    "uniform",
]


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
        self._set(torch.as_tensor(density(u), dtype=torch.float64), num_timesteps, name)

    @classmethod
    def from_table(cls, raw: torch.Tensor, name: str) -> TimestepSchedule:
        """A schedule from unnormalised weights over t = 0..T-1 (e.g. a function of the SNR)."""
        schedule = cls.__new__(cls)
        schedule._set(torch.as_tensor(raw, dtype=torch.float64), int(raw.shape[0]), name)
        return schedule

    def _set(self, raw: torch.Tensor, num_timesteps: int, name: str) -> None:
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


def min_snr(noise: NoiseLevels, gamma: float = 5.0) -> TimestepSchedule:
    """Min-SNR-γ (Hang et al. 2023): the x0 loss weighted by min(SNR(t), γ), as a weight on the model's own
    loss (any process: ``noise.x0_factor`` turns it into the x0 loss; docs/method.md §8).

    Where SNR ≤ γ the weight is SNR·x0_factor, which is 1 for an ε model at every SNR, including a
    zero-SNR last step (``rescale_betas_zero_snr``), where 0·(1/0) would be undefined.
    """
    below = noise.snr * noise.x0_factor
    below = torch.where((noise.snr == 0) & torch.isinf(noise.x0_factor), 1.0, below)  # ε: SNR·(1/SNR) = 1
    weights = torch.where(noise.snr <= gamma, below, gamma * noise.x0_factor)
    return TimestepSchedule.from_table(weights, name=f"min_snr(gamma={gamma:g})")


def inverse_snr(noise: NoiseLevels, gamma: float = 0.0) -> TimestepSchedule:
    """x0 supervision: the model's loss weighted so that it equals the x0 loss (for ε: 1 / SNR(t);
    for the rectified-flow velocity: σ²). ``gamma`` is accepted and ignored.

    Raises:
        UserError: an ε model with a zero-SNR step, whose weight 1 / SNR is infinite there.
    """
    if torch.isinf(noise.x0_factor).any():
        raise UserError(
            "inverse_snr weights an ε model's loss by 1/SNR, which is infinite at this schedule's zero-SNR "
            "step (rescale_betas_zero_snr); use min_snr, or a v-prediction model"
        )
    return TimestepSchedule.from_table(noise.x0_factor, name="inverse_snr")


def pretraining(noise: NoiseLevels, gamma: float = 0.0) -> TimestepSchedule:
    """The density the model was pre-trained with (``model.pretraining_density``): plain fine-tuning as
    the model was trained (SD3's logit-normal; EDM's log-normal σ; uniform for DDPM). ``gamma`` is
    accepted and ignored."""
    return TimestepSchedule.from_table(noise.pretraining, name="pretraining")


def logit_normal_up(noise: NoiseLevels, offset: float = 1.1) -> TimestepSchedule:
    """ψ over the noise level: the model's pre-training density moved toward noise by ``offset`` in
    logit(σ_flow) = −log-SNR / 2 (docs/method.md §12)."""
    table = noise_level.shifted(noise.pretraining, noise.log_snr, offset)
    return TimestepSchedule.from_table(table, name=f"logit_normal_up(offset={offset:g})")


def logit_normal_down(noise: NoiseLevels, offset: float = 1.1) -> TimestepSchedule:
    """ξ over the noise level: the model's pre-training density moved toward data by ``offset``."""
    table = noise_level.shifted(noise.pretraining, noise.log_snr, -offset)
    return TimestepSchedule.from_table(table, name=f"logit_normal_down(offset={offset:g})")


def on_log_snr(schedule: TimestepSchedule, noise: NoiseLevels) -> TimestepSchedule:
    """``schedule``, a density over the index of the DDPM linear β schedule (T = 1000), carried to the
    model whose noise levels are ``noise`` so that both give the same distribution of log-SNR
    (the ``log_snr`` axis; docs/method.md §12). On that DDPM schedule itself it is ``schedule``."""
    if schedule.num_timesteps != noise_level.REFERENCE_T:
        raise ValueError(
            f"a log-SNR port starts from the {noise_level.REFERENCE_T} steps of the DDPM reference"
        )
    table = noise_level.ported(schedule.probs(), noise.log_snr)
    return TimestepSchedule.from_table(table, name=f"{schedule.name}@log_snr")


def timestep_bins(num_timesteps: int, num_bins: int) -> torch.Tensor:
    """Edges of ``num_bins`` near-equal ranges of t: bin b is ``edges[b] <= t < edges[b + 1]``, (num_bins + 1,) long.

    Raises:
        UserError: ``num_bins`` is not in 1..T (a bin would be empty).
    """
    if not 1 <= num_bins <= num_timesteps:
        raise UserError(f"{num_bins} bins of t: use 1 to {num_timesteps} (the model's number of timesteps)")
    return torch.linspace(0, num_timesteps, num_bins + 1).round().long()


def tabulated(bin_weights: Sequence[float], num_timesteps: int, name: str = "tabulated") -> TimestepSchedule:
    """A schedule that is piecewise constant over equal bins of t (:func:`timestep_bins`): weight ``bin_weights[b]``
    for every t of bin b. The number of bins is ``len(bin_weights)``; weights are non-negative, any scale."""
    edges = timestep_bins(num_timesteps, len(bin_weights))
    widths = edges.diff()
    raw = torch.as_tensor(list(bin_weights), dtype=torch.float64).repeat_interleave(widths)
    return TimestepSchedule.from_table(raw, name)


SCHEDULES: dict[str, Callable[[int, float], TimestepSchedule]] = {
    "uniform": uniform,
    "power_up": power_up,
    "power_down": power_down,
}
# schedules over the noise levels of the model: built from its scheduler, not from T alone
SNR_SCHEDULES: dict[str, Callable[[NoiseLevels, float], TimestepSchedule]] = {
    "min_snr": min_snr,
    "inverse_snr": inverse_snr,
    "pretraining": pretraining,
}
# the model's pre-training density moved along log-SNR (by objective.logit_normal_up.offset / _down.offset)
NOISE_LEVEL_SCHEDULES: dict[str, Callable[[NoiseLevels, float], TimestepSchedule]] = {
    "logit_normal_up": logit_normal_up,
    "logit_normal_down": logit_normal_down,
}
# what a power schedule is built on (schedules/ports.py makes a config's axis one of these)
AXES = ("index", "log_snr")
# schedules fitted from data before training: built from a table of per-bin weights over t
FITTED_SCHEDULES: dict[str, Callable[[Sequence[float], int], TimestepSchedule]] = {
    "data_driven": lambda weights, num_timesteps: tabulated(weights, num_timesteps, "data_driven"),
}


def build_schedule(
    name: str,
    num_timesteps: int,
    exponent: float = 1.0,
    noise: NoiseLevels | None = None,
    snr_gamma: float = 5.0,
    fitted: Sequence[float] | None = None,
    axis: str = "index",
    offset: float = 1.1,
) -> TimestepSchedule:
    """Build a schedule by registry name, or from ``"package.module:function"`` (a density over u).

    Args:
        name: a name in :data:`SCHEDULES`, :data:`SNR_SCHEDULES`, :data:`NOISE_LEVEL_SCHEDULES` or
            :data:`FITTED_SCHEDULES`, or ``"package.module:function"``.
        num_timesteps: T.
        exponent: s of the power schedules.
        noise: the model's noise levels (:meth:`ForwardProcess.noise_levels`; needed by
            :data:`SNR_SCHEDULES`, :data:`NOISE_LEVEL_SCHEDULES` and the ``log_snr`` axis).
        snr_gamma: γ of ``min_snr``.
        fitted: the per-bin weights a :data:`FITTED_SCHEDULES` schedule was fitted to (for
            ``data_driven``: ψ or ξ of a :class:`~difftune.schedules.data_driven.DataSchedule`).
        axis: ``index`` (the power law over the normalised index, the paper's) or ``log_snr`` (the
            paper's power law on the DDPM linear schedule, carried to the model by log-SNR).
            ``uniform``, custom, fitted and noise-level schedules are the same on both axes.
        offset: the shift of :data:`NOISE_LEVEL_SCHEDULES` in logit(σ_flow) units (>= 0; ``_down``
            shifts toward data).

    Raises:
        ValueError: unknown name (the message lists the valid names), or a fitted schedule without its fit.
    """
    if name in FITTED_SCHEDULES:
        if fitted is None:
            raise UserError(
                f"schedule {name!r} is fitted from data before training and no fit was given; train with "
                "difftune train (it fits it), or pass the fitted per-bin weights"
            )
        return FITTED_SCHEDULES[name](fitted, num_timesteps)
    if ":" in name:
        return TimestepSchedule(import_object(name, "schedule"), num_timesteps, name=name)
    if axis not in AXES:
        raise UserError(f"schedule axis {axis!r} is unknown; valid: {list(AXES)}")
    needs_noise = (
        name in SNR_SCHEDULES or name in NOISE_LEVEL_SCHEDULES or (axis == "log_snr" and name != "uniform")
    )
    if needs_noise and (noise is None or noise.num_timesteps != num_timesteps):
        raise UserError(f"schedule {name!r} needs the model's {num_timesteps} noise levels")
    if name in SNR_SCHEDULES:
        return SNR_SCHEDULES[name](noise, snr_gamma)
    if name in NOISE_LEVEL_SCHEDULES:
        if offset < 0:
            raise UserError(
                f"schedule {name!r}: offset={offset:g} must be >= 0 (its name gives the direction)"
            )
        return NOISE_LEVEL_SCHEDULES[name](noise, offset)
    if name not in SCHEDULES:
        raise UserError(
            f"unknown schedule {name!r}; valid names: {schedule_names()} or 'package.module:function'"
        )
    if axis == "log_snr" and name != "uniform":  # uniform stays uniform over the index
        return on_log_snr(SCHEDULES[name](noise_level.REFERENCE_T, exponent), noise)
    return SCHEDULES[name](num_timesteps, exponent)
