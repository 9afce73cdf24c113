"""diffusers scheduler objects for the processes, and difftune's default noise schedule.

Code outside :mod:`difftune.process` never names a scheduler class: it asks here for the default
schedule (:data:`DEFAULT_NOISE_SCHEDULE`), a scheduler object of a process (:func:`make_scheduler`)
or a scheduler config read from disk (:func:`read_scheduler_config`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from difftune.process import DEFAULT_SCHEDULER_CLASS, SCHEDULER_CLASSES

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

# The schedule difftune gives a model that comes without one: DDPM's linear betas over 1000 steps,
# epsilon prediction, with every key stated (the DDPM scheduler's defaults, and what difftune's saved
# models have always recorded), so every sampler class builds the same timestep grid from it.
DEFAULT_NOISE_SCHEDULE: dict[str, Any] = {
    "_class_name": DEFAULT_SCHEDULER_CLASS,
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
# the training scheduler class of each process (the one its saved models name)
TRAINING_SCHEDULERS = {name: classes[0] for name, classes in SCHEDULER_CLASSES.items()}
ANCESTRAL_DDPM_SAMPLER = DEFAULT_SCHEDULER_CLASS  # the one sampler that takes the fixed_small variance


def scheduler_class(name: str = DEFAULT_SCHEDULER_CLASS) -> type[SchedulerMixin]:
    """The diffusers scheduler class called ``name`` (imports diffusers)."""
    import diffusers

    return getattr(diffusers, name)


def make_scheduler(process: str = "ddpm", **config: Any) -> SchedulerMixin:
    """A training scheduler object of ``process`` (``ddpm``, ``flow``, ``edm``) with ``config``
    over the class defaults, e.g. for a pipeline's ``scheduler`` component."""
    return scheduler_class(TRAINING_SCHEDULERS[process])(**config)


def read_scheduler_config(
    path: str, subfolder: str | None = None, revision: str | None = None
) -> dict[str, Any]:
    """The scheduler config (``scheduler_config.json``) at a local directory or hub id, as diffusers reads it."""
    return scheduler_class().load_config(path, subfolder=subfolder, revision=revision)


def linear_alphas_cumprod() -> torch.Tensor:
    """ᾱ (T=1000,) float64 of the default DDPM schedule (linear betas 1e-4..0.02); t = 0 the least noisy."""
    return scheduler_class()().alphas_cumprod.to(torch.float64)


__all__ = [
    "DEFAULT_NOISE_SCHEDULE",
    "TRAINING_SCHEDULERS",
    "linear_alphas_cumprod",
    "make_scheduler",
    "read_scheduler_config",
    "scheduler_class",
]
