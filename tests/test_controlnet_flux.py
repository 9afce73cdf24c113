"""A Flux ControlNet (``FluxControlNetModel``) end to end through the CLI, on a tiny random-init Flux.1-dev pipeline.

Nothing is downloaded (:func:`difftune.testing.controlnet.save_flux_controlnet_pipeline`). As the SDXL and SD3
ControlNets (tests/test_controlnet_families.py): a new ControlNet from the transformer's weights, a bank of the
frozen model's samples (guidance 2.5) with control images extracted from them by the annotator, a Diff-Tuning
run resumed exactly, ``sample --prompt --control-image`` reproduced by the stock ``FluxControlNetPipeline`` on
``final/``, LoRA on an existing ControlNet, and the refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from difftune.backbones import FAMILIES, load_pretrained, load_trained
from difftune.backbones.controlnet import CONTROL
from difftune.backbones.controlnet_flux import FluxControlNetBackbone, new_flux_controlnet
from difftune.backbones.families import family_for_config
from difftune.backbones.flux import GUIDANCE, pack
from difftune.backbones.sdxl import POOLED
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.bank import load_bank
from difftune.cli import main
from difftune.control import build_annotator
from difftune.errors import UserError
from difftune.testing.controlnet import save_flux_controlnet_pipeline, save_sd3_controlnet_pipeline
from difftune.testing.flux import tiny_flux_transformer
from test_controlnet_families import (
    assert_sampling_needs_a_control_image,
    assert_stock_pipeline_agrees,
    sample_with_control,
)
from test_flux import BANK_GUIDANCE, _files, _write
from test_flux import _raw as _flux_raw

LORA = {"method": "lora", "lora": {"rank": 4, "alpha": 16.0}}


def _raw(base: Path, captions: Path, out: Path) -> dict:
    """test_flux's run (guidance 2.5, bank of 4, 4 steps) of a new ControlNet on Canny edges, its fidelity measured."""
    validation = {"validation_every": 4, "validation_samples": 2, "sampling": {"steps": 2}}
    raw = _flux_raw(base, captions, out, model={"controlnet": "from_unet"}, data={"annotator": "canny"})
    return {**raw, "train": {**raw["train"], **validation}}


@pytest.fixture(scope="module")
def run(captions: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """bank -> a 4-step Diff-Tuning run of a new ControlNet, and the same cut at step 2 and resumed."""
    out = tmp_path_factory.mktemp("flux_controlnet")
    base = save_flux_controlnet_pipeline(out / "base")
    raw = _raw(base, captions, out)
    config = _write(raw, out / "config.yaml")
    assert main(["bank", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config)]) == 0
    parts = _write({**raw, "train": {**raw["train"], "output_dir": str(out / "parts")}}, out / "parts.yaml")
    assert main(["train", "--config", str(parts), "--set", "train.max_steps=2"]) == 0
    assert main(["train", "--config", str(parts), "--set", "train.resume=latest"]) == 0
    return {"out": out, "base": base}


def test_the_bank_holds_the_frozen_models_samples_with_their_control_images(run: dict) -> None:
    out = run["out"]
    loaded = load_pretrained(str(run["base"]), controlnet="from_unet", guidance=BANK_GUIDANCE)
    assert type(loaded.backbone) is FluxControlNetBackbone and loaded.backbone.control_side == 32
    assert loaded.backbone.condition_names == (PROMPTS, POOLED, GUIDANCE, CONTROL)
    bank = load_bank(str(out / "bank"), loaded)
    edges = build_annotator("canny")(loaded.codec.decode(bank["samples"]))
    assert bank[CONTROL].dtype == torch.uint8 and bank[CONTROL].shape == (4, 3, 32, 32)
    assert torch.equal(bank[CONTROL], (edges * 255).round().to(torch.uint8)) and bank[CONTROL].any()
    assert bank[GUIDANCE].float().tolist() == [BANK_GUIDANCE] * 4
    manifest = json.loads((out / "bank" / "manifest.json").read_text())
    assert manifest["annotator"] == {"name": "canny", "low": 100, "high": 200}
    assert manifest["conditions"] == [PROMPTS, POOLED, GUIDANCE, CONTROL]
    # the bank is the frozen base model's: the plain model reads it too (same fingerprint)
    plain = load_pretrained(str(run["base"]), guidance=BANK_GUIDANCE)
    assert load_bank(str(out / "bank"), plain)["samples"].shape[0] == 4


def test_the_run_resumes_exactly_and_reloads_over_its_frozen_transformer(run: dict) -> None:
    out = run["out"]
    whole, resumed = out / "run" / "final", out / "parts" / "final"
    for sub in ("controlnet", "ema/controlnet"):
        a, b = _files(whole / sub), _files(resumed / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    source = json.loads((whole / "difftune_source.json").read_text())
    assert source["unet"] == [str(run["base"].resolve()), "transformer"]
    trained = load_trained(str(whole), use_ema=False)
    assert trained.family is FAMILIES["flux_controlnet"] and type(trained.backbone) is FluxControlNetBackbone
    assert trained.backbone.guidance == BANK_GUIDANCE  # the value it trained with, recorded for sampling
    config = json.loads((whole / "controlnet" / "config.json").read_text())
    assert config["_class_name"] == "FluxControlNetModel"
    assert family_for_config(config) is FAMILIES["flux_controlnet"]
    assert (config["num_layers"], config["num_single_layers"], config["num_attention_heads"]) == (1, 1, 2)
    frozen = trained.backbone.source_model.state_dict()
    base = load_pretrained(str(run["base"])).backbone.inner.state_dict()
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], v) for k, v in base.items())
    new = load_pretrained(str(run["base"]), controlnet="from_unet").backbone.inner.state_dict()
    assert any(not torch.equal(new[k], v) for k, v in trained.backbone.inner.state_dict().items())
    fidelity = [json.loads(line) for line in (out / "run" / "fidelity.jsonl").read_text().splitlines()]
    assert [row["step"] for row in fidelity] == [0, 4]
    card = (whole / "README.md").read_text()
    assert "--control-image control.png" in card and "--guidance-scale 1" in card


def test_the_stock_controlnet_pipeline_reproduces_difftunes_sample(
    run: dict, captions: Path, tmp_path: Path
) -> None:
    """Without true CFG (a guidance-distilled model's sampling) at the recorded guidance 2.5; the stock pipeline
    takes its default steps (difftune samples on them too) and difftune's initial noise of seed 0 (it draws
    its control latents from the generator before the noise)."""
    from diffusers import FluxControlNetPipeline

    final = run["out"] / "run" / "final"
    ours = sample_with_control(final, captions / "0.png", tmp_path / "s", "--guidance-scale", "1")
    pipe = FluxControlNetPipeline.from_pretrained(str(final))
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    # the guidance embedding's value; difftune's initial noise of seed 0
    assert_stock_pipeline_agrees(
        ours, pipe, "control_image", captions, guidance_scale=BANK_GUIDANCE, latents=pack(noise)
    )


def test_sampling_a_controlnet_needs_a_control_image(run: dict, tmp_path: Path, capsys) -> None:
    assert_sampling_needs_a_control_image(run["out"] / "run" / "final", tmp_path, capsys)


def test_a_new_controlnet_trains_in_full_and_an_existing_one_may_take_lora(
    run: dict, captions: Path, tmp_path: Path, capsys
) -> None:
    raw = _raw(run["base"], captions, tmp_path)
    raw["tuning"] = LORA
    assert main(["train", "--config", str(_write(raw, tmp_path / "new.yaml")), "--dry-run"]) == 2
    assert "train it in full" in capsys.readouterr().err
    existing = save_flux_controlnet_pipeline(tmp_path / "existing", seed=1, controlnet=True)
    raw = _raw(existing, captions, tmp_path)
    raw["model"]["controlnet"] = str(existing / "controlnet")
    raw["tuning"] = LORA
    raw["objective"]["bank_share"] = 0.0
    raw["train"].update(max_steps=2, checkpoint_every=0, validation_every=0, ema_decay=0.0)
    assert main(["train", "--config", str(_write(raw, tmp_path / "lora.yaml"))]) == 0
    trained = load_trained(str(tmp_path / "run" / "final")).backbone.eval()
    start = load_pretrained(str(existing), controlnet=str(existing / "controlnet"), guidance=BANK_GUIDANCE)
    start_backbone = start.backbone.eval()
    assert type(trained) is FluxControlNetBackbone and trained.guidance == BANK_GUIDANCE
    cond = start_backbone.unconditional(2)
    cond = type(cond)({**cond, CONTROL: torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)})
    x, t = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 900.0])
    from difftune.tuning import adapters_off

    with torch.no_grad():
        assert not torch.allclose(trained(x, t, cond), start_backbone(x, t, cond))  # the adapter is on
        with adapters_off(trained):
            torch.testing.assert_close(
                trained(x, t, cond), start_backbone(x, t, cond)
            )  # over exactly that base


def test_the_dry_run_builds_a_new_flux_controlnet_on_the_meta_device(
    run: dict, captions: Path, tmp_path: Path, capsys
) -> None:
    raw = _raw(run["base"], captions, tmp_path)
    raw["objective"]["bank_share"] = 0.0
    assert main(["train", "--config", str(_write(raw, tmp_path / "c.yaml")), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "FluxControlNetModel" in out and "control    computed by {'name': 'canny'" in out
    assert "guidance, control (a guidance embedding" in out and "memory     about" in out
    assert not (tmp_path / "run").exists()


def test_controlnets_of_another_base_or_kind_are_refused(run: dict, tmp_path: Path) -> None:
    base = str(run["base"])
    kinds = {
        "other": (
            new_flux_controlnet(tiny_flux_transformer(guidance_embeds=False)),
            "does not fit the transformer",
        ),
        "union": (_variant(num_mode=2), r"union ControlNet \(num_mode set\)"),
        "hint": (_variant(conditioning_embedding_channels=16), "input_hint_block"),
    }
    for name, (net, message) in kinds.items():
        net.save_pretrained(tmp_path / name)
        with pytest.raises(UserError, match=message):
            load_pretrained(base, controlnet=str(tmp_path / name))
    sd3 = save_sd3_controlnet_pipeline(tmp_path / "sd3", controlnet=True)
    with pytest.raises(UserError, match="holds a SD3ControlNetModel, not a FluxControlNetModel"):
        load_pretrained(base, controlnet=str(sd3 / "controlnet"))
    with pytest.raises(UserError, match="holds a FluxControlNetModel, not an SD3ControlNetModel"):
        load_pretrained(str(sd3), subfolder="transformer", controlnet=str(tmp_path / "other"))


def _variant(**config: object) -> torch.nn.Module:
    """A ControlNet of the tiny transformer with ``config`` changed."""
    from diffusers import FluxControlNetModel

    tiny = new_flux_controlnet(tiny_flux_transformer()).config
    return FluxControlNetModel(**{**{k: v for k, v in tiny.items() if not k.startswith("_")}, **config})
