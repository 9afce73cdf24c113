"""Tiny random-init diffusers models built from configs; nothing is downloaded."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DModel


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they cost 10-100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_dit(
    in_channels: int = 1, sample_size: int = 8, num_classes: int = 5, learn_sigma: bool = True, seed: int = 0
):
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


def tiny_unet(in_channels: int = 1, sample_size: int = 8, num_classes: int = 5, seed: int = 0):
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


def tiny_vae(seed: int = 0):
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


def save_pipeline_dir(root: Path, model, subfolder: str, vae=None, num_train_timesteps: int = 1000) -> Path:
    """Write a pipeline-like directory: <subfolder>/, scheduler/ and optionally vae/."""
    model.save_pretrained(root / subfolder)
    DDPMScheduler(num_train_timesteps=num_train_timesteps).save_pretrained(root / "scheduler")
    if vae is not None:
        vae.save_pretrained(root / "vae")
    return root


@pytest.fixture
def dit_dir(tmp_path: Path) -> Path:
    """A pixel-space tiny DiT (1 channel, 8x8, 5 classes, learned variance) saved as a pipeline dir."""
    return save_pipeline_dir(tmp_path / "dit", tiny_dit(), "transformer")


@pytest.fixture
def unet_dir(tmp_path: Path) -> Path:
    """A pixel-space tiny class-conditional UNet saved as a pipeline dir."""
    return save_pipeline_dir(tmp_path / "unet", tiny_unet(), "unet")


@pytest.fixture
def latent_dit_dir(tmp_path: Path) -> Path:
    """A latent-space tiny DiT (4 channels, 2x2 latents) with a tiny VAE for 16x16 images."""
    return save_pipeline_dir(
        tmp_path / "ldit", tiny_dit(in_channels=4, sample_size=2), "transformer", tiny_vae()
    )


def run_torchrun(cmd: list[str], env: dict[str, str], cwd: Path | None = None, timeout: int = 300) -> str:
    """Run a torchrun command in its own session (a hang is ended with its workers); returns its output.

    The timeout is a safety net, not a speed assertion. Fails the test on a non-zero exit.
    """
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{output[-5000:]}")
    assert proc.returncode == 0, output[-5000:]
    return output
