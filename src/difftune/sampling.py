"""Class-conditional generation with any diffusers scheduler, classifier-free guidance and per-sample seeds.

Each sample owns a generator seeded with its own seed, for its initial noise and for any noise a
stochastic scheduler adds, so a sample depends on its seed and label only: not on the batch it
was generated in, nor on the number of processes (design.md, invariant 6).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import SchedulerMixin
from tqdm.auto import tqdm

from difftune.backbones.base import Backbone
from difftune.backbones.loading import LoadedModel
from difftune.images import save_grid, save_png

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def scheduler_names() -> list[str]:
    """Class names of the diffusers schedulers that can be used for sampling."""
    return sorted(
        name
        for name in dir(diffusers)
        if name.endswith("Scheduler") and inspect.isclass(getattr(diffusers, name, None))
        and issubclass(getattr(diffusers, name), SchedulerMixin)
    )


def build_scheduler(name: str, scheduler_config: dict[str, Any]) -> SchedulerMixin:
    """Instantiate a diffusers scheduler class by name from the model's noise-schedule config.

    The variance channels of a learned-variance model are dropped before the scheduler sees the
    output (as diffusers' DiT pipeline does), so the scheduler is told to use a fixed variance.

    Raises:
        ValueError: unknown scheduler name; the message lists valid names.
    """
    cls = getattr(diffusers, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(scheduler_names())}")
    overrides: dict[str, Any] = {}
    if "variance_type" in inspect.signature(cls.__init__).parameters:
        overrides["variance_type"] = "fixed_small" if name == "DDPMScheduler" else None
    return cls.from_config(scheduler_config, **overrides)


def _model_input_timestep(t: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    return t.reshape(1).expand(n)


@torch.no_grad()
def generate(
    denoiser: Denoiser | Backbone,
    scheduler: SchedulerMixin,
    labels: torch.Tensor,
    seeds: Sequence[int],
    sample_shape: Sequence[int],
    null_label: int,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 25,
    device: torch.device | str = "cpu",
    handover: Denoiser | None = None,
    handover_fraction: float = 0.0,
) -> torch.Tensor:
    """Generate one sample per (label, seed) in the diffusion space.

    Args:
        denoiser: ``f(x_t, t, labels) -> output`` (a backbone); output may carry variance channels.
        scheduler: any diffusers scheduler (its timesteps are set here).
        labels: class labels (N,); the null label gives unconditional samples.
        seeds: one integer seed per sample (N).
        sample_shape: (C, H, W).
        null_label: the unconditional label id (for guidance).
        guidance_scale: classifier-free guidance scale on the epsilon-like channels (1 = off).
        num_inference_steps: sampling steps.
        device: where to run.
        handover: optional second denoiser used for the last ``handover_fraction`` of the steps (the
            chain-of-forgetting probe). It gets the null label, without guidance: a pre-trained model
            does not know the target's classes.
        handover_fraction: fraction of the steps, at the low-noise end, given to ``handover``.

    Returns:
        Samples (N, C, H, W), float32, on ``device``.
    """
    labels = labels.to(device).long()
    if len(seeds) != labels.shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for {labels.shape[0]} labels; give one seed per sample")
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(tuple(sample_shape), generator=g) for g in generators]).to(device)
    scheduler.set_timesteps(num_inference_steps, device=device)
    x = x * scheduler.init_noise_sigma
    C, n = sample_shape[0], labels.shape[0]
    use_cfg = guidance_scale != 1.0
    null_labels = torch.full_like(labels, null_label)
    cond_labels = torch.cat([labels, null_labels])
    switch_at = round((1.0 - handover_fraction) * len(scheduler.timesteps))
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        if handover is not None and i >= switch_at:
            out = handover(x_in, _model_input_timestep(t, n, x.device), null_labels)[:, :C].float()
        elif use_cfg:
            out = denoiser(torch.cat([x_in, x_in]), _model_input_timestep(t, 2 * n, x.device), cond_labels)
            cond, uncond = out[:, :C].float().chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        else:
            out = denoiser(x_in, _model_input_timestep(t, n, x.device), labels)[:, :C].float()
        x = scheduler.step(out, t, x, generator=generators if _accepts_generator(scheduler) else None).prev_sample
    return x


def _accepts_generator(scheduler: SchedulerMixin) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def parse_labels(text: str, num_classes: int | None = None) -> list[int]:
    """Comma-separated labels -> list; with ``num_classes``, each checked against 0..num_classes
    (``num_classes`` itself is the unconditional label).

    Raises:
        ValueError: not integers, empty, or out of range.
    """
    try:
        labels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        labels = []
    if not labels:
        raise ValueError(f"--labels {text!r} must be comma-separated integers, e.g. 0,1,2")
    for label in labels:
        if num_classes is not None and not 0 <= label <= num_classes:
            raise ValueError(
                f"label {label} is out of range: the model has labels 0..{num_classes - 1} "
                f"(and {num_classes} = unconditional)"
            )
    return labels


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> [0, 1]."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def sample_to_folder(
    loaded: LoadedModel,
    labels: Sequence[int],
    per_label: int,
    out: str | os.PathLike,
    scheduler_name: str = "DPMSolverMultistepScheduler",
    num_inference_steps: int = 25,
    guidance_scale: float = 1.5,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> Path:
    """Generate ``per_label`` images for each label into ``out`` (one PNG each, plus ``grid.png``).

    Image i (in label-major order) uses seed ``seed + i``. Returns the grid's path.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = loaded.backbone.to(device).eval()
    codec = loaded.codec.to(device)
    scheduler = build_scheduler(scheduler_name, loaded.scheduler_config)
    all_labels = torch.tensor(labels).repeat_interleave(per_label)
    out = Path(out)
    images = []
    for start in tqdm(range(0, all_labels.numel(), batch_size), desc="sampling"):
        chunk = all_labels[start : start + batch_size]
        seeds = list(range(seed + start, seed + start + chunk.numel()))
        x = generate(
            backbone, scheduler, chunk, seeds, backbone.sample_shape, backbone.null_label,
            guidance_scale, num_inference_steps, device,
        )
        batch = to_unit_range(codec.decode(x)).cpu()
        for offset, image in enumerate(batch):
            i = start + offset
            save_png(image, out / f"{i:05d}_label{int(all_labels[i])}_seed{seed + i}.png")
        images.append(batch)
    grid = out / "grid.png"
    save_grid(torch.cat(images), grid, nrow=per_label, upscale=max(1, 64 // images[0].shape[-1]))
    return grid
