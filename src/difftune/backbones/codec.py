"""Moves data between pixel space and the space the diffusion runs in (VAE latents or pixels)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import AutoencoderKL

from difftune.backbones.fingerprint import model_fingerprint
from difftune.io.log_filters import dropping_messages


class LatentCodec:
    """Encode images to the diffusion space and decode back; the identity for pixel-space models.

    Latents are ``(z - shift) * scaling_factor`` as in the diffusers pipelines. Encoding returns the
    posterior's mean and standard deviation, so a cache of them can be sampled afresh every step,
    as DiT's training does with ``latent_dist.sample()``, without re-running the encoder.

    The codec also owns the facts that differ between latent and pixel space: the image size and
    channels that encode to a given sample shape, and the identity string that keys caches of
    encoded data.

    Args:
        vae: a frozen ``AutoencoderKL``, or ``None`` for pixel space.
        source: where the VAE was loaded from (part of :meth:`identity`).
    """

    def __init__(self, vae: AutoencoderKL | None = None, source: str | None = None) -> None:
        self.vae = vae
        self.source = source
        self.downsample = 1  # image side / sample side
        if vae is not None:
            vae.requires_grad_(False).eval()
            self.scaling = float(vae.config.scaling_factor)
            self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
            # each VAE block but the last halves the resolution, as in the diffusers pipelines
            self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def is_latent(self) -> bool:
        """True when a VAE is used."""
        return self.vae is not None

    @property
    def space(self) -> str:
        """``"latent"`` or ``"pixel"``: the space the diffusion runs in."""
        return "latent" if self.is_latent else "pixel"

    def image_size(self, sample_shape: tuple[int, int, int]) -> int:
        """Side of the (square) images that encode to samples of shape (C, H, W)."""
        return sample_shape[1] * self.downsample

    def image_channels(self, sample_shape: tuple[int, int, int]) -> int:
        """Channels of those images: RGB for a VAE, the sample's own channels in pixel space."""
        return int(self.vae.config.in_channels) if self.vae is not None else sample_shape[0]

    def identity(self, resolution: int) -> str:
        """A string that changes when encoding images of side ``resolution`` would give other samples.

        A VAE is named by where it was loaded from, or, when that is unknown (built in Python), by
        the hash of its weights.
        """
        if self.vae is None:
            return "pixel"
        if self.source is None:
            return f"vae-weights-{model_fingerprint(self.vae)}:{resolution}"
        return f"{self.source}:{resolution}"

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LatentCodec:
        """Move the VAE (if any) to ``device``, and cast it to ``dtype`` unless that is ``None``
        (:meth:`encode` and :meth:`decode` cast their inputs to it and give float32 back)."""
        if self.vae is not None:
            with _without_empty_fp32_warning(self.vae):
                self.vae.to(device=device, **({"dtype": dtype} if dtype is not None else {}))
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1], (N, 3, H, W) -> (mean, std), each (N, C, h, w), in scaled latent units.

        For pixel space, mean is the image and std is zero.
        """
        if self.vae is None:
            return images, torch.zeros_like(images)
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        mean = (dist.mean.float() - self.shift) * self.scaling
        std = dist.std.float() * self.scaling
        return mean, std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion-space samples (N, C, h, w) -> images in [-1, 1], (N, C_img, H, W)."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        z = latents / self.scaling + self.shift
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


@contextlib.contextmanager
def _without_empty_fp32_warning(model: torch.nn.Module) -> Iterator[None]:
    """diffusers warns on every cast of a model with ``to(dtype=...)`` that its modules "that should be
    kept in float32" would be cast too, also when there are none (``[]``): for such a model it says
    nothing."""
    if getattr(model, "_keep_in_fp32_modules", None):
        yield
        return
    with dropping_messages("diffusers.models.modeling_utils", "There are modules in"):
        yield
