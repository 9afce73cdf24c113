"""Tiny random-init diffusers models built from configs, for tests, benchmarks and scripts.

Nothing is downloaded: each builder seeds torch and constructs the model from its config, so the
same call gives the same weights everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DModel

__all__ = ["save_pipeline_dir", "tiny_dit", "tiny_unet", "tiny_vae"]


def tiny_dit(
    in_channels: int = 1, sample_size: int = 8, num_classes: int = 5, learn_sigma: bool = True, seed: int = 0
) -> DiTTransformer2DModel:
    """A 2-layer DiT with patch size 2 (a few thousand parameters)."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_layers=2,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=1,
    )


def tiny_unet(in_channels: int = 1, sample_size: int = 8, num_classes: int = 5, seed: int = 0) -> UNet2DModel:
    """A class-conditional UNet2DModel with a null label row (num_class_embeds = classes + 1)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_classes + 1,
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """An AutoencoderKL with 4 latent channels and an 8x downsampling (16x16 images -> 2x2)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )


def save_pipeline_dir(
    root: Path,
    model: torch.nn.Module,
    subfolder: str,
    vae: AutoencoderKL | None = None,
    num_train_timesteps: int = 1000,
) -> Path:
    """Write a pipeline-like directory: <subfolder>/, scheduler/ and optionally vae/."""
    model.save_pretrained(root / subfolder)
    DDPMScheduler(num_train_timesteps=num_train_timesteps).save_pretrained(root / "scheduler")
    if vae is not None:
        vae.save_pretrained(root / "vae")
    return root
