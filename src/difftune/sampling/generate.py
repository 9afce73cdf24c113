"""Generation with any diffusers scheduler, classifier-free guidance and per-sample seeds.

Each sample owns a generator seeded with its own seed, for its initial noise and for any noise a
stochastic scheduler adds, so a sample depends on its seed and condition only: not on the batch it
was generated in, nor on the number of processes (docs/architecture.md, "Invariants"). The
conditions pass through untouched: the backbone says what "unconditional" is.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import SchedulerMixin

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.config.sampling import SamplingSpec
from difftune.errors import UserError
from difftune.process import process_name, sampler_for
from difftune.process.schedulers import ANCESTRAL_DDPM_SAMPLER

logger = logging.getLogger(__name__)


def scheduler_names() -> list[str]:
    """Class names of the diffusers schedulers that can be used for sampling."""
    return sorted(
        name
        for name in dir(diffusers)
        if name.endswith("Scheduler")
        and inspect.isclass(getattr(diffusers, name, None))
        and issubclass(getattr(diffusers, name), SchedulerMixin)
    )


def build_scheduler(
    name: str,
    scheduler_config: dict[str, Any],
    sample_shape: tuple[int, ...] | None = None,
    options: Mapping[str, Any] | None = None,
) -> SchedulerMixin:
    """Instantiate a diffusers scheduler class by name from the model's noise-schedule config;
    ``sample_shape`` (C, H, W) fixes a flow model's resolution-dependent shift, as in training
    (:func:`difftune.process.flow.fixed_shift`).

    The variance channels of a learned-variance model are dropped before the scheduler sees the
    output (as diffusers' DiT pipeline does), so the scheduler is told to use a fixed variance.

    A sampler of another process than the model's (DPM-Solver++ for a flow model) is replaced by
    that process's own (:func:`difftune.process.sampler_for`, with a warning), and ``options`` are
    then not applied.

    Args:
        options: constructor arguments of the class that replace the model's config
            (``SamplingSpec.scheduler_options``), e.g. ``{"algorithm_type": "sde-dpmsolver++"}``.

    Raises:
        UserError: unknown scheduler name (the message lists valid names), an option the class does
            not take (the message lists those it does), or a value the class refuses.
    """
    cls = getattr(diffusers, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, SchedulerMixin)):
        raise UserError(f"unknown scheduler {name!r}; valid names: {', '.join(scheduler_names())}")
    asked, name = name, sampler_for(name, scheduler_config)
    cls = getattr(diffusers, name)
    parameters = inspect.signature(cls.__init__).parameters
    overrides: dict[str, Any] = {}
    if "variance_type" in parameters:
        overrides["variance_type"] = "fixed_small" if name == ANCESTRAL_DDPM_SAMPLER else None
    if options and name == asked:
        unknown = sorted(set(options) - set(parameters) - {"self"})
        if unknown:
            valid = ", ".join(p for p in parameters if p not in ("self", "kwargs"))
            raise UserError(f"{name} takes no scheduler option {unknown}; its options: {valid}")
        overrides.update(options)
    elif options:
        logger.warning("scheduler options %s are for %s, not %s: not applied", dict(options), asked, name)
    if not (options and name == asked):
        return _instantiate(cls, scheduler_config, sample_shape, overrides)
    try:
        return _instantiate(cls, scheduler_config, sample_shape, overrides)
    except (ValueError, NotImplementedError, TypeError) as err:
        raise UserError(f"{name} refuses the scheduler options {dict(options)}: {err}") from None


def _instantiate(
    cls: type,
    scheduler_config: dict[str, Any],
    sample_shape: tuple[int, ...] | None,
    overrides: dict[str, Any],
) -> SchedulerMixin:
    """``cls`` from the model's config with ``overrides``, a flow model's shift fixed for ``sample_shape``."""
    from difftune.process.flow import fixed_shift, resolution_mu

    mu = resolution_mu(scheduler_config, sample_shape)
    if mu is None or "mu" not in inspect.signature(cls.set_timesteps).parameters:
        return cls.from_config(fixed_shift(scheduler_config, sample_shape), **overrides)
    scheduler = cls.from_config(scheduler_config, **overrides)  # samples as diffusers' Flux pipelines do:
    scheduler.set_timesteps = functools.partial(_flux_timesteps, scheduler.set_timesteps, mu=mu)
    return scheduler


def _flux_timesteps(
    set_timesteps: Any, num_inference_steps: int, device: torch.device | str | None = None, *, mu: float
) -> None:
    """``FluxPipeline``'s steps: σ = linspace(1, 1/n, n), shifted by the resolution's ``mu``."""
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()
    set_timesteps(device=device, sigmas=sigmas, mu=mu)


def handover_step(num_steps: int, fraction: float) -> int:
    """The first of ``num_steps`` sampling steps that a hand-over model takes for the last ``fraction``."""
    return round((1.0 - fraction) * num_steps)


def _model_input_timestep(t: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    return t.reshape(1).expand(n)


@torch.no_grad()
def generate(
    backbone: Backbone,
    scheduler: SchedulerMixin,
    cond: Conditioning,
    seeds: Sequence[int],
    guidance_scale: float = 1.0,
    num_inference_steps: int = 25,
    device: torch.device | str = "cpu",
    handover: Backbone | None = None,
    handover_fraction: float = 0.0,
    guide: Backbone | None = None,
    shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Generate one sample per (condition, seed) in the diffusion space.

    Args:
        backbone: the denoiser; its output may carry variance channels (dropped here).
        scheduler: any diffusers scheduler (its timesteps are set here).
        cond: the conditions of the N samples (``backbone.unconditional(N)`` for unconditional ones).
        seeds: one integer seed per sample (N).
        guidance_scale: classifier-free guidance scale on the epsilon-like channels (1 = off); the
            unconditional branch is ``backbone.drop`` of every condition.
        num_inference_steps: sampling steps.
        device: where to run.
        handover: optional second denoiser used for the last ``handover_fraction`` of the steps (the
            chain-of-forgetting probe). It gets its own unconditional form, without guidance: a
            pre-trained model does not know the target's conditions.
        handover_fraction: fraction of the steps, at the low-noise end, given to ``handover``.
        guide: domain guidance (Zhong et al., ICLR 2025): the pre-trained model, unconditional, is
            the guidance branch in place of ``backbone``'s own unconditional prediction:
            ``guide(x, ∅) + guidance_scale * (backbone(x, c) - guide(x, ∅))``. With a guidance scale
            of 1 it has no effect.
        shape: (C, H, W) of the samples, for a model that samples at other sizes than its own
            (``Backbone.size_buckets``: a bank's bucket); default ``backbone.sample_shape``.

    The samples, the noise and the scheduler's step stay float32 whatever the models' dtype (a model
    cast to bfloat16 or float16, ``--dtype``): only each model call's input is cast to that model's dtype,
    and its output back to float32.

    Returns:
        Samples (N, C, H, W), float32, on ``device``.
    """
    n = cond.batch_size
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} conditions; give one seed per sample")
    cond = cond.to(device)
    sample_shape = tuple(shape or backbone.sample_shape)
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(sample_shape, generator=g) for g in generators]).to(device)
    scheduler.set_timesteps(num_inference_steps, device=device)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # flow samplers start at unit noise and say nothing
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)  # EDM's c_in; none for flow
    C = sample_shape[0]
    use_cfg = guidance_scale != 1.0
    if use_cfg and guide is None:
        both = Conditioning.cat([cond, backbone.drop(cond, torch.ones(n, dtype=torch.bool))])
    guide_cond = guide.unconditional(n, device) if guide is not None else None
    handover_cond = handover.unconditional(n, device) if handover is not None else None
    switch_at = handover_step(len(scheduler.timesteps), handover_fraction)
    dtypes = {model: model_dtype(model) for model in (backbone, guide, handover) if model is not None}

    def _predict(model: Backbone, x_in: torch.Tensor, t: torch.Tensor, bundle: Conditioning) -> torch.Tensor:
        """``model``'s epsilon-like channels in float32, from ``x_in`` cast to the model's own dtype (the
        conditions' tensors are the adapter's to cast: prompt embeddings, control images)."""
        return model(x_in.to(dtypes[model]), t, bundle)[:, :C].float()

    for i, t in enumerate(scheduler.timesteps):
        x_in = scale(x, t)
        if handover is not None and i >= switch_at:
            out = _predict(handover, x_in, _model_input_timestep(t, n, x.device), handover_cond)
        elif use_cfg and guide is not None:
            steps = _model_input_timestep(t, n, x.device)
            cond_out = _predict(backbone, x_in, steps, cond)
            uncond_out = _predict(guide, x_in, steps, guide_cond)
            out = uncond_out + guidance_scale * (cond_out - uncond_out)
        elif use_cfg:
            out = _predict(backbone, torch.cat([x_in, x_in]), _model_input_timestep(t, 2 * n, x.device), both)
            cond_out, uncond_out = out.chunk(2)
            out = uncond_out + guidance_scale * (cond_out - uncond_out)
        else:
            out = _predict(backbone, x_in, _model_input_timestep(t, n, x.device), cond)
        x = scheduler.step(
            out, t, x, generator=generators if _accepts_generator(scheduler) else None
        ).prev_sample
    return x


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in: its diffusers model's (``inner``), else its first floating-point
    parameter's; float32 for a model without one."""
    dtype = getattr(getattr(model, "inner", None), "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return next((p.dtype for p in parameters if p.is_floating_point()), torch.float32)


def generate_with_spec(
    backbone: Backbone,
    scheduler_config: dict[str, Any],
    spec: SamplingSpec,
    cond: Conditioning,
    first_index: int = 0,
    device: torch.device | str = "cpu",
    guide: Backbone | None = None,
    shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """:func:`generate` as ``spec`` says: samples ``first_index ..`` get seeds ``spec.seed + first_index ..``;
    ``guide``: the pre-trained model for domain guidance; ``shape``: the samples' (default the model's)."""
    return generate(
        backbone,
        build_scheduler(
            spec.scheduler, scheduler_config, shape or backbone.sample_shape, spec.scheduler_options
        ),
        cond,
        spec.seeds(first_index, cond.batch_size),
        spec.guidance_scale,
        spec.steps,
        device,
        guide=guide,
        shape=shape,
    )


def load_guide(path: str, model: Any, vae: str | None = None) -> Backbone:
    """The pre-trained model at ``path`` (EMA weights of a difftune directory) as the domain-guidance
    branch of ``model`` (a :class:`~difftune.backbones.loading.LoadedModel`).

    Raises:
        UserError: it works in another sample space or with another noise schedule than ``model``.
    """
    from difftune.backbones import load_trained

    guide = load_trained(path, None, True, vae)
    if tuple(guide.backbone.sample_shape) != tuple(model.backbone.sample_shape):
        raise UserError(
            f"--domain-guidance {path} makes samples of shape {tuple(guide.backbone.sample_shape)}, the model "
            f"{tuple(model.backbone.sample_shape)}; guide with the model it was fine-tuned from"
        )
    # the schedule's values and its process; not its class name (a final/ saved before 2026-12-03 names
    # the DDPM scheduler for a base whose schedule is a PNDM one's)
    keys = ("num_train_timesteps", "prediction_type", "beta_schedule", "beta_start", "beta_end")
    keys += ("shift", "sigma_min", "sigma_max", "sigma_data")  # flow and EDM
    theirs, ours = guide.scheduler_config, model.scheduler_config
    different = [k for k in keys if theirs.get(k) != ours.get(k)]
    if process_name(theirs) != process_name(ours):
        different.insert(0, "process")
    if different:
        raise UserError(
            f"--domain-guidance {path} has another noise schedule ({', '.join(different)} differ); "
            "guide with the model it was fine-tuned from"
        )
    return guide.backbone


def _accepts_generator(scheduler: SchedulerMixin) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> [0, 1]."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
