"""EDM (Karras et al. 2022): x_σ = x0 + σ·ε with the preconditioned network D = c_skip·x + c_out·F(c_in·x, c_noise).

The model's raw output F is regressed on (x0 − c_skip·x_σ) / c_out with unit weight, which is EDM's
λ(σ)-weighted denoising loss exactly (λ = 1 / c_out²). The index t (0 least noisy) runs over
log-uniformly spaced σ between the scheduler's ``sigma_min`` and ``sigma_max``; EDM's own training
density (log σ ~ N(P_mean, P_std²)) is :meth:`EDMProcess.pretraining_density` over that index.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from difftune.errors import UserError
from difftune.process.base import ForwardProcess, per_sample

P_MEAN, P_STD = -1.2, 1.2  # EDM's log-normal training density of σ (Karras et al. 2022, table 1)


class EDMProcess(ForwardProcess):
    """EDM preconditioning around any network that takes (sample, time).

    Args:
        scheduler_config: an ``EDMEulerScheduler`` (or ``EDMDPMSolverMultistepScheduler``) config:
            ``sigma_min``, ``sigma_max``, ``sigma_data``, ``num_train_timesteps``, ``prediction_type``
            (``epsilon``: Karras' F).
    """

    name = "edm"

    def __init__(self, scheduler_config: dict[str, Any]) -> None:
        from diffusers import EDMEulerScheduler

        config = EDMEulerScheduler.from_config(scheduler_config).config
        if config.prediction_type != "epsilon":
            raise UserError(
                f"EDM prediction_type {config.prediction_type!r} is not supported; use 'epsilon' (Karras' F)"
            )
        self.prediction_type = "epsilon"
        self.num_timesteps = int(config.num_train_timesteps)
        self.sigma_data = float(config.sigma_data)
        log_min, log_max = math.log(config.sigma_min), math.log(config.sigma_max)
        u = (torch.arange(self.num_timesteps, dtype=torch.float64) + 0.5) / self.num_timesteps
        self.sigmas = (log_min + u * (log_max - log_min)).exp()  # σ_t, increasing in t

    def _c(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) at indices ``t``, shaped to broadcast against ``like``."""
        sigma, sd = per_sample(self.sigmas, t, like), self.sigma_data
        root = (sigma**2 + sd**2).sqrt()
        return sd**2 / root**2, sigma * sd / root, 1 / root

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x0 + per_sample(self.sigmas, t, x0) * noise

    def model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c_in = self._c(t, x_t)[2]
        return c_in * x_t, (self.sigmas.to(t.device)[t].log() / 4).float()  # c_noise = ln(σ) / 4

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, _ = self._c(t, x0)
        return (x0 - c_skip * self.noised(x0, noise, t)) / c_out

    def x0(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, _ = self._c(t, x_t)
        return c_skip * x_t + c_out * prediction

    def log_snr(self) -> torch.Tensor:
        return -2 * self.sigmas.log()  # data of unit scale: SNR = 1 / σ²

    def x0_factor(self) -> torch.Tensor:
        # x̂0 = c_skip·x + c_out·F̂, so ‖F̂ − F‖² = ‖x̂0 − x0‖² / c_out², c_out² = σ²σ_d² / (σ² + σ_d²)
        sigma2, sd2 = self.sigmas**2, self.sigma_data**2
        return sigma2 * sd2 / (sigma2 + sd2)

    def pretraining_density(self) -> torch.Tensor:
        """p(t) (T,) float64 of EDM's log-normal σ density over this index (log σ is uniform in t)."""
        z = (self.sigmas.log() - P_MEAN) / P_STD
        density = (-0.5 * z**2).exp()
        return density / density.sum()
