"""Rectified flow (Liu et al. 2023; SD3, Flux, SiT): x_σ = (1 − σ)·x0 + σ·ε, velocity target ε − x0.

σ comes from diffusers' ``FlowMatchEulerDiscreteScheduler`` with the model's ``shift``
(σ' = s·σ / (1 + (s − 1)·σ), which adds ln s to logit σ). Index t (0 least noisy) has
σ_t = shifted((t + 1) / T), and the model receives σ_t·T, as in diffusers' SD3 and Flux scripts.

A resolution-dependent (dynamic) shift, as Flux uses, is fixed once for the size of the model's samples
(:func:`fixed_shift`): μ grows linearly with the token count from ``base_shift`` at
``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` (diffusers' Flux pipelines compute it
the same way), and the exponential time shift by μ is the static shift s = e^μ (a linear one: s = μ).
Training and sampling then use that one σ grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from difftune.errors import UserError
from difftune.process.base import ForwardProcess, per_sample

FLOW_DENSITIES = ("uniform", "logit_normal")  # what a flow model may have been pre-trained with


class FlowProcess(ForwardProcess):
    """Rectified flow with the model's shift.

    Args:
        scheduler_config: a ``FlowMatchEulerDiscreteScheduler`` config.
        sample_shape: (C, H, W) of the samples; needed only when the config's shift depends on the
            resolution (``use_dynamic_shifting``), and fixes it (:func:`fixed_shift`): the noise levels
            the schedules are built on (:attr:`sigmas`) are that size's. Samples of another size (an
            aspect-ratio bucket's) are noised on their own size's grid (:meth:`sigmas_for`).
        pretraining: the density the model was pre-trained with (:meth:`pretraining_density`):
            ``uniform`` over the index, or ``logit_normal`` (SD3's logit-normal(0, 1) over unshifted time).

    Raises:
        UserError: a dynamic shift without ``sample_shape``, or an unknown ``pretraining``.
    """

    name = "flow"
    prediction_type = "velocity"

    def __init__(
        self,
        scheduler_config: dict[str, Any],
        sample_shape: tuple[int, ...] | None = None,
        pretraining: str = "uniform",
    ) -> None:
        if pretraining not in FLOW_DENSITIES:
            raise UserError(
                f"a flow model's pre-training density {pretraining!r} is unknown: use one of {list(FLOW_DENSITIES)}"
            )
        self.pretraining = pretraining
        self._config = scheduler_config
        self.sigmas, config = training_sigmas(fixed_shift(scheduler_config, sample_shape))
        self.num_timesteps = int(config.num_train_timesteps)
        self.shift = float(config.shift)
        self._grids: dict[tuple[int, ...], torch.Tensor] = {}
        if sample_shape is not None:
            self._grids[tuple(sample_shape[-2:])] = self.sigmas

    def sigmas_for(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """σ_t (T,) float64 of samples of ``shape`` (``(..., H, W)``): :attr:`sigmas`, unless the shift
        depends on the resolution (``use_dynamic_shifting``, Flux's); then the grid fixed for that size
        (:func:`fixed_shift`), as ``FluxPipeline`` samples an image of that size."""
        if not self._config.get("use_dynamic_shifting"):
            return self.sigmas
        size = tuple(shape[-2:])
        if size not in self._grids:
            self._grids[size] = training_sigmas(fixed_shift(self._config, (1, *size)))[0]
        return self._grids[size]

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = per_sample(self.sigmas_for(x0.shape), t, x0)
        return (1 - sigma) * x0 + sigma * noise

    def model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_t, self.sigmas_for(x_t.shape).to(t.device)[t].float() * self.num_timesteps

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def x0(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t - per_sample(self.sigmas_for(x_t.shape), t, x_t) * prediction

    def log_snr(self) -> torch.Tensor:
        return 2 * ((1 - self.sigmas) / self.sigmas).log()

    def snr(self) -> torch.Tensor:
        return ((1 - self.sigmas) / self.sigmas) ** 2  # 0 at the last index (σ = 1)

    def x0_factor(self) -> torch.Tensor:
        # x̂0 = x_t − σ·v̂, so ‖v̂ − v‖² = ‖x̂0 − x0‖² / σ² = (1 + √SNR)²·‖x̂0 − x0‖²
        return self.sigmas**2

    def pretraining_density(self) -> torch.Tensor:
        """p(t) (T,) float64 the model was pre-trained with: ``uniform`` over the index, or
        ``logit_normal``: unshifted time u ~ sigmoid(N(0, 1)) (SD3's recipe, drawn as diffusers' SD3
        scripts draw it; the density is symmetric, so either end may be noise), so that index t, whose σ is shift((t + 1) / T), gets the
        probability of u in [t / T, (t + 1) / T) (docs/method.md §12)."""
        if self.pretraining == "uniform":
            return super().pretraining_density()
        edges = torch.linspace(0, 1, self.num_timesteps + 1, dtype=torch.float64)
        cdf = torch.special.ndtr(torch.logit(edges))  # logit(0) = -inf, logit(1) = inf: cdf 0 and 1
        return cdf.diff()


def training_sigmas(scheduler_config: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """σ_t (T,) float64 of a static-shift flow config, increasing in t (index 0 the least noisy), and the
    scheduler's full config (defaults filled in)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    steps = int(scheduler.config.num_train_timesteps)
    return scheduler.sigmas[:steps].flip(0).double(), scheduler.config


def resolution_mu(scheduler_config: dict[str, Any], sample_shape: tuple[int, ...] | None) -> float | None:
    """μ of a resolution-dependent (dynamic) shift for samples of ``sample_shape`` (``(C, H, W)``), or
    ``None`` when the config's shift is static.

    The token count is that of a transformer with 2x2 patches, (H / 2)·(W / 2), as Flux counts its
    packed latents; μ is linear in it, as diffusers' Flux pipelines compute it.

    Raises:
        UserError: a dynamic shift and no ``sample_shape``.
    """
    if not scheduler_config.get("use_dynamic_shifting"):
        return None
    if sample_shape is None:
        raise UserError(
            "this flow model's shift depends on the resolution (use_dynamic_shifting), and no sample size "
            "was given to fix it; pass the model's sample shape"
        )
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).config
    tokens = (sample_shape[-2] // 2) * (sample_shape[-1] // 2)
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return cfg.base_shift + slope * (tokens - cfg.base_image_seq_len)


def fixed_shift(scheduler_config: dict[str, Any], sample_shape: tuple[int, ...] | None) -> dict[str, Any]:
    """``scheduler_config`` with a resolution-dependent shift fixed for samples of ``sample_shape``: the
    static shift whose training σ grid is the dynamic one's at that size (e^μ; μ for a linear time
    shift). Any other config is returned unchanged.

    Raises:
        UserError: a dynamic shift and no ``sample_shape``.
    """
    mu = resolution_mu(scheduler_config, sample_shape)
    if mu is None:
        return scheduler_config
    exponential = scheduler_config.get("time_shift_type", "exponential") == "exponential"
    return {**scheduler_config, "use_dynamic_shifting": False, "shift": math.exp(mu) if exponential else mu}
