"""Rectified flow (Liu et al. 2023; SD3, Flux, SiT): x_σ = (1 − σ)·x0 + σ·ε, velocity target ε − x0.

σ comes from diffusers' ``FlowMatchEulerDiscreteScheduler`` with the model's ``shift``
(σ' = s·σ / (1 + (s − 1)·σ), which adds ln s to logit σ). Index t (0 least noisy) has
σ_t = shifted((t + 1) / T), and the model receives σ_t·T, as in diffusers' SD3 and Flux scripts.
"""

from __future__ import annotations

from typing import Any

import torch

from difftune.errors import UserError
from difftune.process.base import ForwardProcess, per_sample


class FlowProcess(ForwardProcess):
    """Rectified flow with a static shift.

    Args:
        scheduler_config: a ``FlowMatchEulerDiscreteScheduler`` config.

    Raises:
        UserError: the config asks for a resolution-dependent (dynamic) shift, which needs the
            sample's size to fix σ (not supported yet).
    """

    name = "flow"
    prediction_type = "velocity"

    def __init__(self, scheduler_config: dict[str, Any]) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        if scheduler.config.use_dynamic_shifting:
            raise UserError(
                "this flow model's scheduler uses a resolution-dependent shift (use_dynamic_shifting), which "
                "difftune does not train yet; set a fixed shift in its scheduler config"
            )
        self.num_timesteps = int(scheduler.config.num_train_timesteps)
        self.sigmas = scheduler.sigmas[: self.num_timesteps].flip(0).double()  # σ_t, increasing in t
        self.shift = float(scheduler.config.shift)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = per_sample(self.sigmas, t, x0)
        return (1 - sigma) * x0 + sigma * noise

    def model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_t, self.sigmas.to(t.device)[t].float() * self.num_timesteps

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def x0(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t - per_sample(self.sigmas, t, x_t) * prediction

    def log_snr(self) -> torch.Tensor:
        return 2 * ((1 - self.sigmas) / self.sigmas).log()

    def snr(self) -> torch.Tensor:
        return ((1 - self.sigmas) / self.sigmas) ** 2  # 0 at the last index (σ = 1)

    def x0_factor(self) -> torch.Tensor:
        # x̂0 = x_t − σ·v̂, so ‖v̂ − v‖² = ‖x̂0 − x0‖² / σ² = (1 + √SNR)²·‖x̂0 − x0‖²
        return self.sigmas**2

    # pretraining_density: uniform over the index (σ = shift((t + 1) / T)). A scheduler config does not say
    # how the model was trained; SD3's logit-normal, for one, would have to be stated (docs/method.md §12)
