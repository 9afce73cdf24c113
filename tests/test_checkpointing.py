"""Gradient checkpointing covers every model the loss backpropagates through: a ControlNet's frozen UNet as
well as the ControlNet (as diffusers' ControlNet script does), with the same gradients and fewer saved
activations. Tiny random-init models; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difftune.backbones import load_pretrained
from difftune.backbones.base import enable_gradient_checkpointing
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.controlnet import CONTROL
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.testing.models import save_sd_pipeline
from difftune.training.memory_estimate import SavedActivations


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def _gradients(sd_dir: Path, checkpointing: str) -> tuple[dict[str, torch.Tensor], int, list[bool]]:
    """The ControlNet's gradients of one loss, the bytes autograd saved for it, and each model's switch;
    ``checkpointing``: ``none``, ``controlnet`` (the ControlNet alone) or ``run`` (what a run turns on)."""
    backbone = load_pretrained(str(sd_dir), controlnet="from_unet").backbone.train()
    if checkpointing == "controlnet":
        backbone.inner.enable_gradient_checkpointing()
    elif checkpointing == "run":
        enable_gradient_checkpointing(backbone)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10, 900])
    control = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    cond = Conditioning({PROMPTS: torch.randn(2, 16, 32, generator=g), CONTROL: control})
    counter = SavedActivations(backbone)
    with counter.hooks():
        loss = backbone(x, t, cond).square().mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in backbone.inner.named_parameters() if p.grad is not None}
    switches = [model.is_gradient_checkpointing for model in backbone.backpropagated_models()]
    return grads, counter.total, switches


def test_a_controlnet_checkpoints_its_frozen_unet_too_with_the_same_gradients(sd_dir: Path) -> None:
    plain, saved_plain, off = _gradients(sd_dir, "none")
    alone, saved_alone, _ = _gradients(sd_dir, "controlnet")
    checkpointed, saved, on = _gradients(sd_dir, "run")
    assert off == [False, False] and on == [True, True]
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)
    assert saved < saved_alone < saved_plain
