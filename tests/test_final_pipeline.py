"""``final/`` describes itself: class names always, and a stock ``DiTPipeline`` for a latent DiT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline

from difftune.backbones import load_pretrained
from difftune.training.loop import Trainer
from test_training import make_cfg


def test_latent_dit_final_loads_as_a_stock_pipeline(latent_dit_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(latent_dit_dir, tmp_path / "run", None, "data.resolution=16", "train.max_steps=1")
    final = Trainer(cfg).train()
    assert json.loads((final / "class_names.json").read_text()) == ["5", "6", "7", "8", "9"]
    pipe = DiTPipeline.from_pretrained(final)
    assert pipe.labels == {"5": 0, "6": 1, "7": 2, "8": 3, "9": 4}
    # guidance 1: the stock pipeline's null label is ImageNet's 1000 (as in a fine-tuned DiT-XL/2),
    # which this 5-class test model does not have
    images = pipe(
        class_labels=pipe.get_label_ids(["7"]), num_inference_steps=2, guidance_scale=1.0, output_type="np"
    ).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    # the pipeline's transformer is the trained one, and the VAE is the model's own
    trained = load_pretrained(str(final), subfolder="transformer")
    for a, b in zip(pipe.transformer.parameters(), trained.backbone.inner.parameters(), strict=True):
        assert torch.equal(a, b)
    source_vae = load_pretrained(str(latent_dit_dir)).codec.vae.state_dict()
    assert all(torch.equal(v, source_vae[k]) for k, v in pipe.vae.state_dict().items())
    # difftune itself still records where the VAE came from (the key of target caches)
    assert load_pretrained(str(final)).vae_source == str(latent_dit_dir)


def test_pixel_final_carries_class_names(dit_dir: Path, tmp_path: Path) -> None:
    final = Trainer(make_cfg(dit_dir, tmp_path / "run", None, "train.max_steps=1")).train()
    assert json.loads((final / "class_names.json").read_text()) == ["5", "6", "7", "8", "9"]
    assert not (final / "model_index.json").exists()  # no stock pipeline runs a pixel-space DiT


def test_merged_lora_of_a_latent_dit_loads_as_a_stock_pipeline(latent_dit_dir: Path, tmp_path: Path) -> None:
    from difftune.backbones import load_trained, merged_model
    from difftune.cli import main

    cfg = make_cfg(
        latent_dit_dir,
        tmp_path / "run",
        None,
        "data.resolution=16",
        "train.max_steps=2",
        "tuning.method=lora",
        "train.learning_rate=1e-2",
    )
    final = Trainer(cfg).train()
    assert not (final / "model_index.json").exists()  # an adapter is not a pipeline until merged
    out = tmp_path / "merged"
    assert main(["export", str(final), "--out", str(out), "--merge"]) == 0
    pipe = DiTPipeline.from_pretrained(out)
    assert pipe.labels == {"5": 0, "6": 1, "7": 2, "8": 3, "9": 4}
    expected = merged_model(load_trained(str(final)).backbone.inner)  # the EMA adapter, merged
    for (name, a), b in zip(pipe.transformer.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(a, b), name


def _run_card_code(folder: Path) -> dict:
    """Execute the Python block of ``folder``'s README.md with its path filled in; the names it defines."""
    card = (folder / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("THIS_FOLDER", str(folder))
    names: dict = {}
    exec(code, names)
    return names


def test_final_says_how_to_load_it_and_what_the_stock_pipeline_cannot_do(
    latent_dit_dir: Path, tmp_path: Path
) -> None:
    final = Trainer(
        make_cfg(latent_dit_dir, tmp_path / "run", None, "data.resolution=16", "train.max_steps=1")
    ).train()
    loaded = _run_card_code(final)
    trained = load_pretrained(str(final), subfolder="transformer").backbone.inner
    for a, b in zip(loaded["pipe"].transformer.parameters(), trained.parameters(), strict=True):
        assert torch.equal(a, b)
    ema = load_pretrained(str(final), subfolder="ema/transformer").backbone.inner
    assert all(torch.equal(a, b) for a, b in zip(loaded["ema"].parameters(), ema.parameters(), strict=True))
    card = (final / "README.md").read_text()
    assert "null label is 5" in card and "guidance_scale=1" in card and "difftune sample" in card


def test_a_merged_pixel_export_says_how_stock_diffusers_loads_it(
    dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from difftune.cli import main

    cfg = make_cfg(dit_dir, tmp_path / "run", None, "tuning.method=bitfit", "train.max_steps=1")
    final = Trainer(cfg).train()
    out = tmp_path / "merged"
    assert main(["export", str(final), "--out", str(out), "--merge"]) == 0
    assert (
        f'DiTTransformer2DModel.from_pretrained("{out}", subfolder="transformer")' in capsys.readouterr().out
    )
    model = _run_card_code(out)["model"]
    merged = load_pretrained(str(out)).backbone.inner
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), merged.parameters(), strict=True))
    assert "## Guidance" not in (out / "README.md").read_text()  # no stock pipeline for a pixel DiT
