"""Stable Diffusion XL text-to-image Diff-Tuning end to end, on a tiny random-init SDXL pipeline.

Nothing is downloaded: the pipeline (an SDXL-style UNet, two CLIP text encoders with a local
character-level tokenizer, a tiny VAE) is built from configs
(:func:`difftune.testing.models.save_sdxl_pipeline`). The runs go through the CLI: bank, train
(full and LoRA), an exact resume, ``sample --prompt``, the stock pipeline on ``final/``, diffusers'
``load_lora_weights`` and the dry run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from difftune.backbones import FAMILIES, ConditionRequest, load_pretrained, load_trained, register_family
from difftune.backbones.families import family_for_config
from difftune.backbones.lora_layout import LORA_WEIGHTS
from difftune.backbones.sdxl import POOLED, TIME_IDS, SDXLBackbone
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.bank import load_bank
from difftune.bank.conditions import prepare_bank_conditions
from difftune.cli import main
from difftune.config.experiment import config_from_dict
from difftune.testing.models import save_sd_pipeline, save_sdxl_pipeline, tiny_sdxl_unet
from test_stable_diffusion import CAPTIONS

LORA = {"method": "lora", "lora": {"rank": 4, "alpha": 16.0}}
TIGHT = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


def _raw(xl_dir: Path, captions: Path, out: Path, **sections: dict) -> dict:
    raw = {
        "model": {"pretrained": str(xl_dir)},
        "data": {"source": "captions", "path": str(captions), "cache_dir": str(out / "cache")},
        "bank": {"path": str(out / "bank"), "num_samples": 4, "sampling": {"steps": 2}, "batch_size": 4},
        "objective": {"bank_share": 0.5, "cfg_dropout": 0.5},
        "train": {
            "output_dir": str(out / "run"),
            "batch_size": 4,
            "max_steps": 4,
            "checkpoint_every": 2,
            "log_every": 1,
            "learning_rate": 1e-2,
            "ema_decay": 0.5,
            "sample_every": 0,
        },
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def _write(raw: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def _inputs() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10, 900])
    added = {
        "text_embeds": torch.randn(2, 24, generator=g),
        "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
    }
    return x, t, {"encoder_hidden_states": torch.randn(2, 16, 80, generator=g), "added_cond_kwargs": added}


@torch.no_grad()
def _unet_out(unet: torch.nn.Module) -> torch.Tensor:
    x, t, kwargs = _inputs()
    return unet.eval()(x, t, **kwargs).sample


def _files(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_the_registry_gives_sdxl_configs_to_their_family_and_keeps_the_rest_with_sd(tmp_path: Path) -> None:
    sd, xl = FAMILIES["stable_diffusion"], FAMILIES["stable_diffusion_xl"]
    unet = {"_class_name": "UNet2DConditionModel"}
    assert family_for_config(unet) is sd
    assert family_for_config({**unet, "addition_embed_type": None}) is sd
    assert family_for_config({**unet, "addition_embed_type": "text_time"}) is xl
    assert load_pretrained(str(save_sd_pipeline(tmp_path / "sd"))).family is sd
    # a second family that claims every config of a class is refused; SDXL's narrows it, so it may share it
    with pytest.raises(TypeError, match="another family loads.*must narrow it"):
        register_family(type("Twin", (type(sd),), {"name": "twin"})())
    assert "twin" not in FAMILIES
    # SD's adapter refuses an SDXL UNet (and the other way round) in one line
    from difftune.backbones.stable_diffusion import TextConditionalBackbone
    from difftune.errors import UserError
    from difftune.testing.models import tiny_cond_unet

    with pytest.raises(UserError, match="addition_embed_type='text_time'.*SDXL"):
        TextConditionalBackbone(tiny_sdxl_unet())
    with pytest.raises(UserError, match="does not fit SDXLBackbone"):
        SDXLBackbone(tiny_cond_unet(cross_attention_dim=80))


@pytest.mark.parametrize("zeros", [True, False], ids=["force_zeros", "empty_prompt"])
def test_conditions_and_unconditional_form_are_the_stock_pipelines(zeros: bool, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    root = save_sdxl_pipeline(tmp_path / "pipe")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": zeros}))
    loaded = load_pretrained(str(root))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(root))
    prompts = ["a red circle", "a blue square"]
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu")
    cond, _ = loaded.family.sample_conditions(loaded, ConditionRequest(prompts=prompts))
    torch.testing.assert_close(cond[PROMPTS], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond[POOLED], pooled, rtol=0, atol=0)
    ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=24)
    assert torch.equal(cond[TIME_IDS], ids.expand(2, -1))
    # guidance's second branch: the pipeline's negative one (zeros, or the empty prompt's), same size ids
    dropped = loaded.backbone.drop(cond, torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(dropped[PROMPTS], negative, rtol=0, atol=1e-6)  # encoded alone, not in a batch
    torch.testing.assert_close(dropped[POOLED], negative_pooled, rtol=0, atol=1e-6)
    assert torch.equal(dropped[TIME_IDS], cond[TIME_IDS])
    assert bool(negative.abs().sum() == 0) is zeros
    # the backbone's forward is the UNet's as the pipeline calls it
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    added = {"text_embeds": pooled, "time_ids": ids.expand(2, -1)}
    with torch.no_grad():
        expected = pipe.unet(x, torch.tensor([5, 500]), encoder_hidden_states=embeds, added_cond_kwargs=added)
        assert torch.equal(loaded.backbone.eval()(x, torch.tensor([5, 500]), cond), expected.sample)


@pytest.fixture(scope="module")
def full_run(xl_dir: Path, captions: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bank -> a 4-step full Diff-Tuning run, and the same run cut at step 2 and resumed; the run's folder."""
    out = tmp_path_factory.mktemp("full")
    raw = _raw(xl_dir, captions, out)
    config = _write(raw, out / "config.yaml")
    assert main(["bank", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config)]) == 0
    parts = _write(
        _raw(xl_dir, captions, out, train={**raw["train"], "output_dir": str(out / "parts")}), out / "p.yaml"
    )
    assert main(["train", "--config", str(parts), "--set", "train.max_steps=2"]) == 0
    assert main(["train", "--config", str(parts), "--set", "train.resume=latest"]) == 0
    return out


def test_the_bank_and_the_target_cache_hold_all_three_conditions(full_run: Path, xl_dir: Path) -> None:
    loaded = load_pretrained(str(xl_dir))
    bank = load_bank(str(full_run / "bank"), loaded)
    # sample i was generated from caption i mod 4
    embeds, pooled = loaded.parts.prompts.encode([CAPTIONS[i % 4] for i in range(4)])
    assert torch.equal(bank[PROMPTS], embeds.half()) and torch.equal(bank[POOLED], pooled.half())
    assert torch.equal(bank[TIME_IDS], torch.tensor([[32.0, 32, 0, 0, 32, 32]]).expand(4, -1))
    manifest = json.loads((full_run / "bank" / "manifest.json").read_text())
    assert manifest["conditions"] == [PROMPTS, POOLED, TIME_IDS]
    cache = json.loads((full_run / "cache" / "manifest.json").read_text())
    assert cache["conditions"].startswith("prompts:text-xl:")


def test_a_full_run_resumes_exactly_and_loads_in_the_stock_pipeline(full_run: Path, xl_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    whole, resumed = full_run / "run" / "final", full_run / "parts" / "final"
    for sub in ("unet", "ema/unet"):
        a, b = _files(whole / sub), _files(resumed / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    rows = [json.loads(line) for line in (full_run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["loss/total"]) and row["loss/bank"] > 0 for row in rows)  # both streams
    pipe = StableDiffusionXLPipeline.from_pretrained(str(whole))
    out = pipe(
        "a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    )
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    ours = load_trained(str(whole), use_ema=False).backbone.inner
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(ours), rtol=0, atol=0)  # the trained weights
    base = load_pretrained(str(xl_dir)).backbone.inner
    assert (_unet_out(ours) - _unet_out(base)).abs().max() > 1e-3  # and they trained


def test_sample_takes_prompts_on_a_full_runs_final(full_run: Path, tmp_path: Path) -> None:
    final = full_run / "run" / "final"
    args = ["sample", "--model", str(final), "--prompt", "a red circle", "--prompt", "a blue square"]
    assert (
        main(
            [*args, "--per-label", "1", "--steps", "2", "--guidance-scale", "3", "--out", str(tmp_path / "s")]
        )
        == 0
    )
    names = sorted(p.name for p in (tmp_path / "s").glob("0*.png"))
    assert names == ["00000_prompt0_seed0.png", "00001_prompt1_seed1.png"]
    assert np.asarray(Image.open(tmp_path / "s" / names[0])).shape == (32, 32, 3)


@pytest.fixture(scope="module")
def lora_run(xl_dir: Path, captions: Path, full_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step LoRA Diff-Tuning run on the full run's bank, and the same cut at step 2 and resumed."""
    out = tmp_path_factory.mktemp("lora")
    for name, steps in (
        ("run", []),
        ("parts", ["--set", "train.max_steps=2"]),
        ("parts", ["--set", "train.resume=latest"]),
    ):
        raw = _raw(xl_dir, captions, out, tuning=LORA, bank={"path": str(full_run / "bank")})
        raw["train"]["output_dir"] = str(out / name)
        assert main(["train", "--config", str(_write(raw, out / f"{name}.yaml")), *steps]) == 0
    return out


def test_a_lora_run_resumes_exactly_and_stock_diffusers_loads_its_lora(lora_run: Path, xl_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    whole, resumed = lora_run / "run" / "final", lora_run / "parts" / "final"
    for sub in ("adapter", "ema/adapter"):
        a, b = load_file(str(whole / sub / LORA_WEIGHTS)), load_file(str(resumed / sub / LORA_WEIGHTS))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    base = _unet_out(load_pretrained(str(xl_dir)).backbone.inner)
    for use_ema, sub in ((True, "ema/adapter"), (False, "adapter")):
        ours = _unet_out(load_trained(str(whole), use_ema=use_ema).backbone.inner)
        pipe = StableDiffusionXLPipeline.from_pretrained(str(xl_dir))
        pipe.load_lora_weights(str(whole / sub))
        stock = _unet_out(pipe.unet)
        torch.testing.assert_close(stock, ours, **TIGHT)
        assert (stock - base).abs().max() > 1e3 * TIGHT["atol"]  # the LoRA is on, at its trained scale
    card = (whole / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "load_lora_weights" in card


def test_sample_takes_prompts_on_a_lora_runs_final(lora_run: Path, tmp_path: Path) -> None:
    args = [
        "sample",
        "--model",
        str(lora_run / "run" / "final"),
        "--prompt",
        "a red circle",
        "--per-label",
        "1",
    ]
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "00000_prompt0_seed0.png").is_file()


@pytest.mark.parametrize("mode", ["empty", "class_swap"])
def test_bank_prompt_modes_embed_the_chosen_prompts(
    mode: str, xl_dir: Path, captions: Path, tmp_path: Path
) -> None:
    bank = {"prompts": mode}
    if mode == "class_swap":
        bank["class_swap"] = {"instance": "red", "class_word": "green"}
    cfg = config_from_dict(_raw(xl_dir, captions, tmp_path, bank=bank))
    loaded = load_pretrained(str(xl_dir))
    prepare_bank_conditions(loaded, cfg)
    expected = [""] if mode == "empty" else [c.replace("red", "green") for c in CAPTIONS]
    embeds, pooled = loaded.parts.prompts.encode(expected)
    cond = loaded.backbone.bank_condition(torch.arange(len(expected)))
    assert torch.equal(cond[PROMPTS], embeds.half()) and torch.equal(cond[POOLED], pooled.half())


def test_the_dry_run_checks_an_sdxl_run(
    xl_dir: Path, captions: Path, full_run: Path, tmp_path: Path, capsys
) -> None:
    raw = _raw(xl_dir, captions, tmp_path, tuning=LORA, bank={"path": str(full_run / "bank")})
    config = _write(raw, tmp_path / "config.yaml")
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "UNet2DConditionModel" in out and "pooled_prompt_embeds" in out and "time_ids" in out
    assert not (tmp_path / "run").exists()


def test_a_v_prediction_sdxl_trains_on_the_velocity(captions: Path, tmp_path: Path) -> None:
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

    from difftune.backbones import Conditioning
    from difftune.config.experiment import ObjectiveConfig
    from difftune.objectives import build_objective
    from difftune.process import build_process
    from difftune.training.loop import train_model

    root = save_sdxl_pipeline(tmp_path / "pipe")
    euler = EulerDiscreteScheduler.from_pretrained(str(root / "scheduler"), prediction_type="v_prediction")
    euler.save_pretrained(root / "scheduler")
    loaded = load_pretrained(str(root))
    reference = DDPMScheduler.from_config(loaded.scheduler_config)  # diffusers' own formulas
    objective = build_objective(
        ObjectiveConfig(bank_share=0.0, cfg_dropout=0.0),
        build_process(loaded.scheduler_config),
        loaded.backbone,
    )
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4, generator=g)
    cond, _ = loaded.family.sample_conditions(
        loaded, ConditionRequest(prompts=["a red circle", "a blue square"])
    )
    draw = objective.draw(2, 0, (4, 4, 4), g)
    with torch.no_grad():
        terms = objective(loaded.backbone, x0, Conditioning(cond), torch.zeros(2, dtype=torch.bool), draw)
        out = loaded.backbone(reference.add_noise(x0, draw.noise, draw.t), draw.t, cond)
    velocity = reference.get_velocity(x0, draw.noise, draw.t)
    torch.testing.assert_close(terms.terms["mse"], (out - velocity).square().mean(dim=(1, 2, 3)))
    raw = _raw(
        root, captions, tmp_path, objective={"bank_share": 0.0}, train={"max_steps": 1, "checkpoint_every": 0}
    )
    final = train_model(config_from_dict(raw))
    assert (
        StableDiffusionXLPipeline.from_pretrained(str(final)).scheduler.config.prediction_type
        == "v_prediction"
    )


def test_the_readme_sdxl_example_is_a_valid_config() -> None:
    import re

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n(model:\n  pretrained: stabilityai/stable-diffusion-xl.*?)\n```", text, re.S)
    assert block is not None
    cfg = config_from_dict(yaml.safe_load(block.group(1)))
    assert cfg.tuning.method == "lora" and cfg.bank.prompts == "class_swap"
