"""Stable Diffusion 3 text-to-image Diff-Tuning end to end, on a tiny random-init SD3 pipeline.

Nothing is downloaded: the pipeline (an ``SD3Transformer2DModel``, two CLIP text encoders with the local
character-level tokenizer, a T5 encoder with a character-level tokenizer built with ``tokenizers``, a
tiny VAE with SD3's shift factor, SD3's flow scheduler with shift 3) is built from configs
(:func:`difftune.testing.sd3.save_sd3_pipeline`). The runs go through the CLI: bank, train (full and
LoRA), an exact resume, ``sample --prompt``, the stock pipeline on ``final/``, diffusers'
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

from difftune.backbones import FAMILIES, ConditionRequest, load_pretrained, load_trained
from difftune.backbones.families import family_for_config
from difftune.backbones.lora_layout import LORA_WEIGHTS
from difftune.backbones.sd3 import SD3Backbone
from difftune.backbones.sdxl import POOLED
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.bank import load_bank
from difftune.cli import main
from difftune.errors import UserError
from difftune.testing.sd3 import SD3_SHIFT, save_sd3_pipeline
from test_stable_diffusion import CAPTIONS

LORA = {"method": "lora", "lora": {"rank": 4, "alpha": 16.0}}
TIGHT = {"rtol": 1e-5, "atol": 1e-5}
FLOW_SHIFT_3_MEAN_SIGMA = 0.677  # docs/method.md §8: mean σ of flow with shift 3 under a uniform index


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


def _raw(root: Path, captions: Path, out: Path, **sections: dict) -> dict:
    raw = {
        "model": {"pretrained": str(root)},
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


@torch.no_grad()
def _out(transformer: torch.nn.Module) -> torch.Tensor:
    """The transformer's output on fixed inputs, called as the pipeline calls it."""
    g = torch.Generator().manual_seed(0)
    return transformer.eval()(
        hidden_states=torch.randn(2, 4, 4, 4, generator=g),
        encoder_hidden_states=torch.randn(2, 20, 48, generator=g),
        pooled_projections=torch.randn(2, 24, generator=g),
        timestep=torch.tensor([10.0, 900.0]),
    ).sample


def _files(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_the_registry_gives_sd3_transformers_to_their_family(sd3_dir: Path) -> None:
    assert family_for_config({"_class_name": "SD3Transformer2DModel"}) is FAMILIES["stable_diffusion_3"]
    loaded = load_pretrained(str(sd3_dir))
    assert type(loaded.backbone) is SD3Backbone and loaded.family is FAMILIES["stable_diffusion_3"]
    assert loaded.backbone.sample_shape == (4, 4, 4) and not loaded.backbone.learns_variance
    controlnet = load_pretrained(str(sd3_dir), controlnet="from_unet")  # tests/test_controlnet_families.py
    assert controlnet.family is FAMILIES["sd3_controlnet"]


def test_a_pipeline_without_its_t5_encoder_is_refused_in_one_line(tmp_path: Path) -> None:
    root = save_sd3_pipeline(tmp_path / "pipe")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(
        json.dumps({**index, "text_encoder_3": [None, None], "tokenizer_3": [None, None]})
    )
    with pytest.raises(UserError, match=r"no T5 text encoder \(text_encoder_3 is null\)") as err:
        load_pretrained(str(root))
    assert "\n" not in str(err.value)


def test_conditions_unconditional_form_and_forward_are_the_stock_pipelines(sd3_dir: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    loaded = load_pretrained(str(sd3_dir))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    prompts = ["a red circle", "a blue square"]
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, None, None, device="cpu")
    cond, _ = loaded.family.sample_conditions(loaded, ConditionRequest(prompts=prompts))
    assert cond[PROMPTS].shape == (2, 16 + 256, 48)  # CLIP's 16 tokens (padded to T5's width), T5's 256
    torch.testing.assert_close(cond[PROMPTS], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond[POOLED], pooled, rtol=0, atol=0)
    # guidance's second branch: the pipeline's negative one, the empty prompt encoded (not zeros)
    dropped = loaded.backbone.drop(cond, torch.tensor([True, False]))
    torch.testing.assert_close(
        dropped[PROMPTS][:1], negative[:1], rtol=0, atol=1e-6
    )  # encoded alone, not in a batch
    torch.testing.assert_close(dropped[POOLED][:1], negative_pooled[:1], rtol=0, atol=1e-6)
    assert torch.equal(dropped[PROMPTS][1], cond[PROMPTS][1])
    assert negative.abs().sum() > 0
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pipe.transformer(
            hidden_states=x,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=torch.tensor([5.0, 500.0]),
        ).sample
        assert torch.equal(loaded.backbone.eval()(x, torch.tensor([5.0, 500.0]), cond), expected)


def test_long_prompts_warn_once_with_the_count_and_the_pipelines_own_warnings_are_dropped(
    sd3_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loaded = load_pretrained(str(sd3_dir))
    prompts = ["a red circle", "a very long prompt about a red circle on a blue square"]
    assert loaded.parts.prompts.count_truncated(prompts) == 1  # longer than CLIP's 16 tokens here
    with caplog.at_level("WARNING"):
        loaded.family.sample_conditions(loaded, ConditionRequest(prompts=prompts))
    said = [record.getMessage() for record in caplog.records]
    assert said == [
        "1 of 2 prompts are longer than the text encoders' 16 (CLIP) or 256 (T5) tokens and are truncated"
    ]


def test_training_and_sampling_use_sd3s_flow_with_shift_3(sd3_dir: Path) -> None:
    """Training draws σ on the shift-3 grid and feeds the model σ·1000; difftune's sampler is the
    pipeline's (same timesteps, same latents from the same seed with guidance)."""
    from diffusers import StableDiffusion3Pipeline

    from difftune.process import build_process
    from difftune.sampling.generate import build_scheduler, generate

    loaded = load_pretrained(str(sd3_dir))
    process = build_process(loaded.scheduler_config, loaded.backbone.sample_shape)
    assert process.name == "flow" and process.shift == SD3_SHIFT
    t = torch.arange(1000)
    u = (t + 1) / 1000
    torch.testing.assert_close(
        process.sigmas, SD3_SHIFT * u / (1 + (SD3_SHIFT - 1) * u), rtol=0, atol=1e-6, check_dtype=False
    )
    assert (
        abs(process.sigmas.mean().item() - FLOW_SHIFT_3_MEAN_SIGMA) < 5e-4
    )  # uniform index: mean σ as documented
    _, timestep = process.model_input(torch.zeros(3, 4, 4, 4), torch.tensor([0, 499, 999]))
    torch.testing.assert_close(timestep, process.sigmas[[0, 499, 999]].float() * 1000)
    assert timestep.max() == 1000 and timestep.min() > 0  # SD3's transformer reads [0, 1000]
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    sampler = build_scheduler(
        "DPMSolverMultistepScheduler", loaded.scheduler_config, loaded.backbone.sample_shape
    )
    assert type(sampler).__name__ == "FlowMatchEulerDiscreteScheduler" and sampler.config.shift == SD3_SHIFT
    cond, _ = loaded.family.sample_conditions(loaded, ConditionRequest(prompts=["a red circle"]))
    ours = generate(loaded.backbone.eval(), sampler, cond, [7], guidance_scale=4.0, num_inference_steps=3)
    pipe.scheduler.set_timesteps(3)
    torch.testing.assert_close(sampler.timesteps, pipe.scheduler.timesteps)
    stock = pipe(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, stock, **TIGHT)


@pytest.fixture(scope="module")
def full_run(sd3_dir: Path, captions: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bank -> a 4-step full Diff-Tuning run, and the same run cut at step 2 and resumed; the run's folder."""
    out = tmp_path_factory.mktemp("full")
    raw = _raw(sd3_dir, captions, out)
    config = _write(raw, out / "config.yaml")
    assert main(["bank", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config)]) == 0
    parts = _write(
        _raw(sd3_dir, captions, out, train={**raw["train"], "output_dir": str(out / "parts")}), out / "p.yaml"
    )
    assert main(["train", "--config", str(parts), "--set", "train.max_steps=2"]) == 0
    assert main(["train", "--config", str(parts), "--set", "train.resume=latest"]) == 0
    return out


def test_the_bank_and_the_target_cache_hold_both_conditions(full_run: Path, sd3_dir: Path) -> None:
    loaded = load_pretrained(str(sd3_dir))
    bank = load_bank(str(full_run / "bank"), loaded)
    embeds, pooled = loaded.parts.prompts.encode(
        [CAPTIONS[i % 4] for i in range(4)]
    )  # sample i: caption i mod 4
    assert torch.equal(bank[PROMPTS], embeds.half()) and torch.equal(bank[POOLED], pooled.half())
    manifest = json.loads((full_run / "bank" / "manifest.json").read_text())
    assert manifest["conditions"] == [PROMPTS, POOLED]
    cache = json.loads((full_run / "cache" / "manifest.json").read_text())
    assert cache["conditions"].startswith("prompts:text-sd3:")


def test_a_full_run_resumes_exactly_and_loads_in_the_stock_pipeline(full_run: Path, sd3_dir: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    whole, resumed = full_run / "run" / "final", full_run / "parts" / "final"
    for sub in ("transformer", "ema/transformer"):
        a, b = _files(whole / sub), _files(resumed / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    rows = [json.loads(line) for line in (full_run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["loss/total"]) and row["loss/bank"] > 0 for row in rows)  # both streams
    pipe = StableDiffusion3Pipeline.from_pretrained(str(whole))
    out = pipe(
        "a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    )
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    ours = load_trained(str(whole), use_ema=False).backbone.inner
    torch.testing.assert_close(_out(pipe.transformer), _out(ours), rtol=0, atol=0)  # the trained weights
    base = load_pretrained(str(sd3_dir)).backbone.inner
    assert (_out(ours) - _out(base)).abs().max() > 1e-3  # and they trained
    assert pipe.scheduler.config.shift == SD3_SHIFT


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
def lora_run(sd3_dir: Path, captions: Path, full_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step LoRA Diff-Tuning run on the full run's bank, and the same cut at step 2 and resumed."""
    out = tmp_path_factory.mktemp("lora")
    for name, steps in (
        ("run", []),
        ("parts", ["--set", "train.max_steps=2"]),
        ("parts", ["--set", "train.resume=latest"]),
    ):
        raw = _raw(sd3_dir, captions, out, tuning=LORA, bank={"path": str(full_run / "bank")})
        raw["train"]["output_dir"] = str(out / name)
        assert main(["train", "--config", str(_write(raw, out / f"{name}.yaml")), *steps]) == 0
    return out


def test_a_lora_run_resumes_exactly_and_stock_diffusers_loads_its_lora(lora_run: Path, sd3_dir: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    whole, resumed = lora_run / "run" / "final", lora_run / "parts" / "final"
    for sub in ("adapter", "ema/adapter"):
        a, b = load_file(str(whole / sub / LORA_WEIGHTS)), load_file(str(resumed / sub / LORA_WEIGHTS))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
        assert all(key.startswith("transformer.") for key in a)
    # both streams' attention projections, as diffusers' SD3 LoRA training adapts them
    keys = load_file(str(whole / "adapter" / LORA_WEIGHTS)).keys()
    assert any(".attn.add_q_proj.lora_A" in key for key in keys) and any(
        ".attn.to_q.lora_A" in key for key in keys
    )
    base = _out(load_pretrained(str(sd3_dir)).backbone.inner)
    for use_ema, sub in ((True, "ema/adapter"), (False, "adapter")):
        ours = _out(load_trained(str(whole), use_ema=use_ema).backbone.inner)
        pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
        pipe.load_lora_weights(str(whole / sub))
        stock = _out(pipe.transformer)
        torch.testing.assert_close(stock, ours, **TIGHT)
        assert (stock - base).abs().max() > 1e3 * TIGHT["atol"]  # the LoRA is on, at its trained scale
    card = (whole / "README.md").read_text()
    assert "StableDiffusion3Pipeline.from_pretrained" in card and "load_lora_weights" in card


def test_a_merged_export_of_a_lora_run_is_a_stock_sd3_pipeline(lora_run: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    final, out = lora_run / "run" / "final", tmp_path / "merged"
    assert main(["export", str(final), "--out", str(out), "--merge"]) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out))
    ours = _out(load_trained(str(final)).backbone.inner)  # the EMA adapter on its base
    torch.testing.assert_close(_out(pipe.transformer), ours, **TIGHT)


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


def test_the_dry_run_checks_an_sd3_run(
    sd3_dir: Path, captions: Path, full_run: Path, tmp_path: Path, capsys
) -> None:
    raw = _raw(sd3_dir, captions, tmp_path, tuning=LORA, bank={"path": str(full_run / "bank")})
    config = _write(raw, tmp_path / "config.yaml")
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "SD3Transformer2DModel" in out and "pooled_prompt_embeds" in out
    assert not (tmp_path / "run").exists()


ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "configs" / "recipes" / "sd35_medium_lora.yaml"


def test_the_sd35_medium_recipe_is_a_checkpointed_bf16_lora_run_that_checks_on_an_sd3(
    sd3_dir: Path, tmp_path: Path, capsys
) -> None:
    from difftune.config.experiment import load_config

    cfg = load_config(RECIPE)
    assert cfg.model.pretrained == "stabilityai/stable-diffusion-3.5-medium"
    assert cfg.tuning.method == "lora" and cfg.tuning.lora.targets is None  # the family's SD3 targets
    assert cfg.train.mixed_precision == "bf16" and cfg.train.gradient_checkpointing
    assert cfg.bank.sampling.scheduler == "FlowMatchEulerDiscreteScheduler" and cfg.bank_count > 0
    # its dry runs on a (tiny) SD3 pipeline: the bank's swapped prompts, the model and the LoRA fit
    (tmp_path / "data").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "data" / "0.png")
    row = {"file_name": "0.png", "text": "a photo of sks dog"}
    (tmp_path / "data" / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    sets = ["--set", f"data.path={tmp_path / 'data'}", "--set", f"bank.path={tmp_path / 'bank'}"]
    sets += ["--set", f"train.output_dir={tmp_path / 'run'}", "--set", f"model.pretrained={sd3_dir}"]
    sets += ["--set", "data.resolution=32"]
    assert main(["bank", "--config", str(RECIPE), "--dry-run", *sets]) == 0
    assert "with 'sks dog' replaced by 'dog'" in capsys.readouterr().out
    assert (
        main(["train", "--config", str(RECIPE), "--dry-run", *sets, "--set", "objective.bank_share=0"]) == 0
    )
    out = capsys.readouterr().out
    assert "SD3Transformer2DModel" in out and "lora tuning" in out and "precision bf16" in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "bank").exists()


def test_the_readme_sd3_example_is_a_valid_config() -> None:
    import re

    from difftune.config.experiment import config_from_dict

    text = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(model:\n  pretrained: stabilityai/stable-diffusion-3.*?)\n```", text, re.S)
    assert block is not None
    cfg = config_from_dict(yaml.safe_load(block.group(1)))
    assert cfg.tuning.method == "lora" and cfg.bank.prompts == "class_swap"
    assert (
        cfg.bank.sampling.scheduler == "FlowMatchEulerDiscreteScheduler" and cfg.train.gradient_checkpointing
    )
