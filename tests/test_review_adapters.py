"""Review: an adapter trained on a saved model whose VAE sits in another pipeline's ``vae/`` reloads."""

from __future__ import annotations

from pathlib import Path

import torch

from difftune.backbones import load_pretrained, load_trained
from difftune.backbones.adapters import apply_tuning
from difftune.backbones.saving import save_model


def test_an_adapter_on_a_saved_latent_model_reloads(latent_dit_dir: Path, tmp_path: Path) -> None:
    full = load_pretrained(str(latent_dit_dir))
    apply_tuning(full, "full")
    save_model(full, tmp_path / "tuned")  # records its VAE as (latent_dit_dir, "vae")
    base = load_pretrained(str(tmp_path / "tuned"))
    apply_tuning(base, "bitfit")
    with torch.no_grad():
        for p in base.backbone.inner.parameters():
            if p.requires_grad:
                p.add_(0.05)
    save_model(base, tmp_path / "adapter")
    again = load_trained(str(tmp_path / "adapter"))
    assert (again.vae_source, again.vae_subfolder) == (str(latent_dit_dir), "vae")
    vae = again.codec.vae.state_dict()
    assert all(torch.equal(v, vae[k]) for k, v in full.codec.vae.state_dict().items())
    x, t = torch.randn(2, *base.backbone.sample_shape), torch.tensor([3, 700])
    cond = base.backbone.unconditional(2)
    with torch.no_grad():
        torch.testing.assert_close(again.backbone.eval()(x, t, cond), base.backbone.eval()(x, t, cond))
