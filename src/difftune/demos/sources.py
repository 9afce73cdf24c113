"""The demos' source models, one per forward process, each of about 1.4M parameters on 8x8 pixels.

- ``ddpm``: a DiT (4 heads x 32, 4 layers, 2x2 patches) with a learned variance, diffusers' default
  linear β schedule (the test beds of every study before the continuous-time processes);
- ``flow``: the same DiT without the variance channel, trained on rectified flow with a
  ``FlowMatchEulerDiscreteScheduler`` at shift 1 (SiT's linear interpolant; 8x8 pixels need no shift);
- ``edm``: a class-conditional ``UNet2DModel`` (40/80 channels, attention at 4x4) with EDM's
  preconditioning, σ in [0.002, 80] and σ_data = 0.5 (Karras et al. 2022).

Each model has one label row per source class plus the null row that classifier-free guidance uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiTTransformer2DModel, SchedulerMixin, UNet2DModel
from diffusers.models.modeling_utils import ModelMixin

from difftune.process.schedulers import make_scheduler

PROCESSES = ("ddpm", "flow", "edm")
# the sampler of each process's demo: DPM-Solver++ (2nd order) for DDPM, Euler for flow (as SD3 and
# Flux sample), DPM-Solver++ on Karras' σ steps for EDM
SAMPLERS = {
    "ddpm": "DPMSolverMultistepScheduler",
    "flow": "FlowMatchEulerDiscreteScheduler",
    "edm": "EDMDPMSolverMultistepScheduler",
}


@dataclass(frozen=True)
class SourceArchitecture:
    """A demo source model's random-init weights and noise schedule, and the folder that holds them."""

    model: ModelMixin
    scheduler: SchedulerMixin
    folder: str  # "transformer" or "unet": the subfolder of a diffusers model directory


def model_folder(process: str) -> str:
    """The subfolder that holds a demo source model of ``process``."""
    return "unet" if process == "edm" else "transformer"


def source_scheduler(process: str) -> SchedulerMixin:
    """The noise schedule of a demo source model of ``process`` (its training scheduler)."""
    if process == "edm":
        return make_scheduler(
            "edm", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type="epsilon"
        )
    return make_scheduler() if process == "ddpm" else make_scheduler("flow", shift=1.0)


def build_source_architecture(
    process: str, classes: int, width: int, layers: int, seed: int
) -> SourceArchitecture:
    """The untrained source model of ``process`` for ``classes`` labels (+ the null row).

    ``width`` (attention head dimension) and ``layers`` size the DiTs; the EDM UNet has a fixed size
    of the same order (1.5M parameters).
    """
    torch.manual_seed(seed)
    if process == "edm":
        unet = UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            layers_per_block=2,
            block_out_channels=(40, 80),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            num_class_embeds=classes + 1,
        )
        return SourceArchitecture(unet, source_scheduler(process), model_folder(process))
    dit = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=width,
        in_channels=1,
        out_channels=2 if process == "ddpm" else 1,
        num_layers=layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=classes,
        norm_num_groups=1,
    )
    return SourceArchitecture(dit, source_scheduler(process), model_folder(process))
