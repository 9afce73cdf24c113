"""Review: ``difftune export --merge`` of an adapter on an existing ControlNet."""

from __future__ import annotations

from pathlib import Path

import torch

from difftune.backbones import load_pretrained, load_trained
from difftune.backbones.adapters import apply_tuning
from difftune.backbones.saving import save_model, save_pipeline_index
from difftune.cli import main
from difftune.config.tuning import LoraSettings, TuningConfig
from difftune.testing.models import save_sd_pipeline


def test_a_lora_on_a_controlnet_exports_merged(tmp_path: Path) -> None:
    pipe = save_sd_pipeline(tmp_path / "cn", controlnet=True)
    loaded = load_pretrained(str(pipe), controlnet=str(pipe / "controlnet"))
    apply_tuning(loaded, "lora", TuningConfig(method="lora", lora=LoraSettings(rank=2)))
    with torch.no_grad():
        for p in loaded.backbone.inner.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    final = tmp_path / "final"
    save_model(loaded, final)
    save_pipeline_index(loaded, final, [])
    out = tmp_path / "merged"
    assert main(["export", str(final), "--out", str(out), "--merge"]) == 0
    merged = load_trained(str(out)).backbone.eval()
    tuned = load_trained(str(final)).backbone.eval()
    x, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    cond = tuned.unconditional(2)
    cond = type(cond)({**cond, "control": torch.full_like(cond["control"], 255)})
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, cond), tuned(x, t, cond), rtol=1e-4, atol=1e-5)
