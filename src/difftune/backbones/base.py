"""The one interface every backbone adapter implements (k-diffusion ``external.py`` style)."""

from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    """A class-conditional denoiser: ``forward(x_t, t, labels) -> raw model output``.

    Subclasses wrap one diffusers model class and override :meth:`forward` only. The adapter knows
    nothing of timestep weighting or the training loop.

    Attributes:
        inner: the wrapped diffusers model (what ``save_pretrained`` writes).
        num_classes: number of source classes; the null (unconditional) label is ``num_classes``.
        learns_variance: the output has ``2 * C`` channels (epsilon-like prediction + variance
            interpolation values in [-1, 1], as DiT / improved DDPM).
        sample_shape: (C, H, W) of the space the diffusion runs in (latents or pixels).
    """

    inner: nn.Module
    num_classes: int
    learns_variance: bool
    sample_shape: tuple[int, int, int]
    subfolder: str

    @property
    def null_label(self) -> int:
        """Label id of the unconditional branch (used by the bank stream and CFG dropout)."""
        return self.num_classes

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict from ``x_t`` (N, C, H, W), integer timesteps ``t`` (N,) and labels (N,).

        Returns:
            (N, C, H, W), or (N, 2C, H, W) when :attr:`learns_variance`.
        """
        raise NotImplementedError

    def check_target_classes(self, num_target_classes: int) -> None:
        """Refuse a target label set that does not fit in the source's label rows 0..K-1."""
        if num_target_classes > self.num_classes:
            raise ValueError(
                f"target dataset has {num_target_classes} classes but the source model has only "
                f"{self.num_classes} label rows; use a source model with at least as many classes"
            )
