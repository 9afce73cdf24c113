"""A LoRA run of the Stable Diffusion family also writes diffusers' LoRA layout, which stock diffusers
loads into the same function difftune trained: ``pipe.load_lora_weights`` for the UNet,
``ControlNetModel.load_lora_adapter`` for a ControlNet. Other methods and families write none.

Tiny random-init models; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difftune.backbones import load_pretrained, load_trained, save_model
from difftune.backbones.adapters import apply_tuning
from difftune.backbones.lora_layout import LORA_WEIGHTS
from difftune.config.tuning import LoraSettings, TuningConfig
from difftune.testing.models import save_pipeline_dir, save_sd_pipeline, tiny_dit
from difftune.training.loop import train_model
from test_stable_diffusion import _config

LORA = {"method": "lora", "lora": {"rank": 4, "alpha": 16.0}}  # scale alpha / r = 4: the loader must keep it
TIGHT = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def _train(pipe: Path, captions: Path, out: Path, **sections: dict) -> Path:
    """A 2-step LoRA run (EMA decay 0.5, so the EMA and the trained weights differ); its ``final/``."""
    train = {"learning_rate": 1e-2, "ema_decay": 0.5, "sample_every": 0}
    return train_model(
        _config(pipe, captions, out, tuning=LORA, objective={"bank_share": 0.0}, train=train, **sections)
    )


@pytest.fixture(scope="module")
def sd_run(sd_dir: Path, captions: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(sd_dir, captions, tmp_path_factory.mktemp("run"))


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10, 900]), torch.randn(2, 16, 32, generator=g)


@torch.no_grad()
def _stock_unet(sd_dir: Path, lora: Path | None) -> torch.Tensor:
    """The UNet output of the stock pipeline, with the LoRA in ``lora`` loaded by diffusers."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    x, t, prompts = _inputs()
    return pipe.unet.eval()(x, t, encoder_hidden_states=prompts).sample


def _card_code(folder: Path) -> dict:
    """Run the code of the model card's section on the LoRA in stock diffusers; the names it defines."""
    card = (folder / "README.md").read_text().split("## The LoRA in stock diffusers", 1)[1]
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("THIS_FOLDER", str(folder))
    names: dict = {}
    exec(code, names)
    return names


@pytest.mark.parametrize("use_ema", [True, False], ids=["ema/adapter", "adapter"])
def test_the_stock_pipeline_loads_the_lora_difftune_trained(
    sd_run: Path, sd_dir: Path, use_ema: bool
) -> None:
    folder = sd_run / ("ema/adapter" if use_ema else "adapter")
    assert (folder / LORA_WEIGHTS).is_file() and (folder / "adapter_model.safetensors").is_file()
    x, t, prompts = _inputs()
    with torch.no_grad():
        ours = load_trained(str(sd_run), use_ema=use_ema).backbone.inner.eval()(x, t, prompts).sample
    stock = _stock_unet(sd_dir, folder)
    torch.testing.assert_close(stock, ours, **TIGHT)
    base = _stock_unet(sd_dir, None)
    assert (stock - base).abs().max() > 1e3 * TIGHT["atol"]  # the LoRA is on, at its trained scale
    other = _stock_unet(sd_dir, sd_run / ("adapter" if use_ema else "ema/adapter"))
    assert (stock - other).abs().max() > 1e3 * TIGHT["atol"]  # each folder holds its own weights


def test_the_model_card_shows_the_stock_call(sd_run: Path) -> None:
    x, t, prompts = _inputs()
    with torch.no_grad():
        ours = load_trained(str(sd_run)).backbone.inner.eval()(x, t, prompts).sample  # EMA weights
        stock = _card_code(sd_run)["pipe"].unet.eval()(x, t, encoder_hidden_states=prompts).sample
    torch.testing.assert_close(stock, ours, **TIGHT)


def test_a_stock_controlnet_loads_the_lora_difftune_trained(captions: Path, tmp_path: Path) -> None:
    """No pipeline loads a ControlNet's LoRA; the ControlNet's own ``load_lora_adapter`` does, as the card says."""
    from diffusers import ControlNetModel

    pipe = save_sd_pipeline(tmp_path / "cn", controlnet=True)
    final = _train(
        pipe,
        captions,
        tmp_path,
        model={"controlnet": str(pipe / "controlnet")},
        data={"annotator": "canny"},
    )
    x, t, prompts = _inputs()
    control = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = load_trained(str(final)).backbone.inner.eval()
        expected = ours(x, t, prompts, controlnet_cond=control, return_dict=False)
        stock = _card_code(final)["pipe"].controlnet.eval()
        found = stock(x, t, prompts, controlnet_cond=control, return_dict=False)
        base = ControlNetModel.from_pretrained(str(pipe / "controlnet")).eval()
        before = base(x, t, prompts, controlnet_cond=control, return_dict=False)
    torch.testing.assert_close(found, expected, **TIGHT)
    assert (found[1] - before[1]).abs().max() > 1e3 * TIGHT["atol"]


@pytest.mark.parametrize("case", ["loha on stable diffusion", "lora on dit"])
def test_no_diffusers_layout_where_no_stock_loader_reads_it(case: str, sd_dir: Path, tmp_path: Path) -> None:
    """LoHa has no diffusers LoRA layout; a DiT's stock LoRA loader is peft's (its format, unchanged)."""
    method, model = case.split(" on ")
    source = (
        sd_dir
        if model == "stable diffusion"
        else save_pipeline_dir(tmp_path / "dit", tiny_dit(), "transformer")
    )
    loaded = load_pretrained(str(source))
    apply_tuning(loaded, method, TuningConfig(method=method, lora=LoraSettings(rank=2, alpha=2.0)))
    save_model(loaded, tmp_path / "saved")
    assert (tmp_path / "saved" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "saved").glob(f"**/{LORA_WEIGHTS}"))
