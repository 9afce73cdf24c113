"""The forward process as one object: what the loop and the objective know of the noise.

A process maps the training index ``t`` (0..T-1, **0 the least noisy**, on every process) to the
noisy sample, the model's inputs, the regression target and back to x0. The objective, the binned
loss and the probes call it and never see β, ᾱ or σ (the role of ``GaussianDiffusion`` in DiT and
of the model wrappers in k-diffusion).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class NoiseLevels:
    """What schedules over the noise level read of a process: one float64 (T,) table each, per index t.

    Attributes:
        log_snr: log SNR(t), strictly decreasing (``-inf`` where the index is pure noise).
        snr: SNR(t) (for DDPM its own ᾱ / (1 - ᾱ), so its tables stay exactly what they were).
        x0_factor: the model's regression loss at t times this is the x0 loss ‖x̂0 − x0‖²
            (:meth:`ForwardProcess.x0_factor`).
        pretraining: p(t), the density the model was pre-trained with over its index.
    """

    log_snr: torch.Tensor
    snr: torch.Tensor
    x0_factor: torch.Tensor
    pretraining: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        """T."""
        return int(self.log_snr.shape[0])


def per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` (a (T,) table) shaped (N, 1, 1, ...) to broadcast against ``like`` (N, ...)."""
    return values.to(device=t.device)[t].view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class ForwardProcess(ABC):
    """Noising, targets and log-SNR of one kind of diffusion model, indexed by ``t`` in 0..T-1.

    Attributes:
        name: the registry name (``ddpm``, ``flow``, ``edm``).
        num_timesteps: T, the number of training indices.
        prediction_type: what the model's output is regressed on (the scheduler's ``prediction_type``,
            or ``velocity`` for rectified flow).
        has_variance_term: the process defines a variational-bound term for models that learn
            their variance (DDPM only).
    """

    name: str
    num_timesteps: int
    prediction_type: str
    has_variance_term: bool = False

    @abstractmethod
    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (N, C, H, W) of clean ``x0`` and standard-normal ``noise`` (N, C, H, W) at indices ``t`` (N,)."""

    @abstractmethod
    def model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the model receives for x_t at indices ``t``: (its input sample, its time value (N,))."""

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model's raw output should equal for ``noised(x0, noise, t)`` (N, C, H, W)."""

    @abstractmethod
    def x0(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0 estimate (N, C, H, W) implied by the model's raw ``prediction`` at ``x_t``, ``t``."""

    @abstractmethod
    def log_snr(self) -> torch.Tensor:
        """log SNR(t) for t = 0..T-1, float64 (T,), strictly decreasing: the comparable noise level."""

    @abstractmethod
    def x0_factor(self) -> torch.Tensor:
        """float64 (T,): the squared error of the raw output at t, times this, is the squared error of the
        x0 it implies. :meth:`x0` is affine in the prediction, x̂0 = a·x_t + b(t)·prediction, so the
        factor is b(t)² (docs/method.md §8): 1/SNR for ε, σ² for the rectified-flow velocity."""

    def snr(self) -> torch.Tensor:
        """SNR(t), float64 (T,)."""
        return self.log_snr().exp()

    def pretraining_density(self) -> torch.Tensor:
        """p(t) (T,) float64 the model was pre-trained with over this index: uniform unless the
        process states another (EDM's log-normal σ)."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def noise_levels(self) -> NoiseLevels:
        """The tables schedules over the noise level are built from."""
        return NoiseLevels(self.log_snr(), self.snr(), self.x0_factor(), self.pretraining_density())

    def equivalent_alphas_cumprod(self) -> torch.Tensor:
        """ᾱ(t) (T,) of the variance-preserving process with this one's SNR, sigmoid(log SNR); 1 − ᾱ is a
        noise level in [0, 1] that compares across processes (finite where SNR = 0)."""
        return torch.sigmoid(self.log_snr())

    def describe(self) -> dict[str, Any]:
        """A record of the process for logs and manifests."""
        return {
            "process": self.name,
            "num_timesteps": self.num_timesteps,
            "prediction_type": self.prediction_type,
        }
