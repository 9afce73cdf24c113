"""Flux.1-dev text-to-image Diff-Tuning end to end, on a tiny random-init Flux pipeline.

Nothing is downloaded: the pipeline (a ``FluxTransformer2DModel`` with a guidance embedding, a CLIP text
encoder with the local character-level tokenizer, a T5 encoder with a character-level tokenizer built
with ``tokenizers``, a 16-channel VAE with Flux's shift and scaling factors, Flux.1-dev's scheduler with
its resolution-dependent shift) is built from configs (:func:`difftune.testing.flux.save_flux_pipeline`).
The runs go through the CLI: bank, train (full and LoRA), an exact resume, ``sample --prompt``, the stock
``FluxPipeline`` on ``final/``, diffusers' ``load_lora_weights``, the dry run and the recipes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difftune.backbones import FAMILIES, ConditionRequest, load_pretrained, load_trained
from difftune.backbones.families import family_for_config
from difftune.backbones.flux import GUIDANCE, FluxBackbone
from difftune.backbones.lora_layout import LORA_WEIGHTS
from difftune.backbones.sdxl import POOLED
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.bank import load_bank
from difftune.cli import main
from difftune.errors import UserError
from difftune.testing.flux import save_flux_pipeline
from test_sd3 import _raw as sd3_raw
from test_sd3 import _write
from test_stable_diffusion import CAPTIONS

LORA = {"method": "lora", "lora": {"rank": 4, "alpha": 16.0}}
TIGHT = {"rtol": 1e-5, "atol": 1e-5}
BANK_GUIDANCE = 2.5  # model.guidance when the bank is made (not FluxPipeline's default 3.5)
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe")


def _raw(root: Path, captions: Path, out: Path, **sections: dict) -> dict:
    """test_sd3's run (bank of 4, 4 steps, checkpoints at 2) with model.guidance at :data:`BANK_GUIDANCE`."""
    model = {"guidance": BANK_GUIDANCE, **sections.pop("model", {})}
    return sd3_raw(root, captions, out, model=model, **sections)


@torch.no_grad()
def _out(transformer: torch.nn.Module) -> torch.Tensor:
    """The transformer's output on fixed packed inputs, called as ``FluxPipeline`` calls it."""
    g = torch.Generator().manual_seed(0)
    return transformer.eval()(
        hidden_states=torch.randn(2, 4, 64, generator=g),
        encoder_hidden_states=torch.randn(2, 20, 48, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g),
        timestep=torch.tensor([0.01, 0.9]),
        img_ids=torch.tensor([[0.0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]),
        txt_ids=torch.zeros(20, 3),
        guidance=torch.tensor([3.5, 3.5]),
    ).sample


def _files(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_the_registry_gives_flux_transformers_to_their_family(flux_dir: Path, tmp_path: Path) -> None:
    assert family_for_config({"_class_name": "FluxTransformer2DModel"}) is FAMILIES["flux"]
    loaded = load_pretrained(str(flux_dir))
    assert type(loaded.backbone) is FluxBackbone and loaded.family is FAMILIES["flux"]
    # 16-channel latents of the VAE's 32-pixel sample size (8x down), packed 2x2 by the adapter
    assert loaded.backbone.sample_shape == (16, 4, 4) and not loaded.backbone.learns_variance
    assert loaded.backbone.condition_names == (PROMPTS, POOLED, GUIDANCE)
    assert loaded.backbone.guidance == 3.5  # FluxPipeline's default
    assert load_pretrained(str(flux_dir), guidance=2.0).backbone.guidance == 2.0
    # model.controlnet: a FluxControlNetModel over it (tests/test_controlnet_flux.py)
    controlnet = load_pretrained(str(flux_dir), controlnet="from_unet")
    assert (
        controlnet.family is FAMILIES["flux_controlnet"]
        and controlnet.backbone.condition_names[-1] == "control"
    )
    # a model without a guidance embedding (schnell's kind) has no guidance condition and refuses one
    schnell = load_pretrained(str(save_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)))
    assert schnell.backbone.condition_names == (PROMPTS, POOLED)
    with pytest.raises(UserError, match="has no guidance embedding"):
        load_pretrained(str(tmp_path / "schnell"), guidance=2.0)


def test_conditions_unconditional_form_and_forward_are_the_stock_pipelines(flux_dir: Path) -> None:
    from diffusers import FluxPipeline

    loaded = load_pretrained(str(flux_dir))
    pipe = FluxPipeline.from_pretrained(str(flux_dir))
    prompts = ["a red circle", "a blue square"]
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, device="cpu")
        negative, negative_pooled, _ = pipe.encode_prompt([""], None, device="cpu")
    cond, _ = loaded.family.sample_conditions(loaded, ConditionRequest(prompts=prompts))
    assert cond[PROMPTS].shape == (2, 512, 48) and cond[POOLED].shape == (2, 32)  # T5's 512, CLIP pooled
    torch.testing.assert_close(cond[PROMPTS], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond[POOLED], pooled, rtol=0, atol=0)
    assert cond[GUIDANCE].tolist() == [3.5, 3.5]
    # guidance's second branch (true_cfg_scale's negative one, the empty prompt); the row keeps its guidance
    rows = cond.where(torch.tensor([False, True]), cond.select(torch.tensor([0, 0])))
    rows = type(cond)({**rows, GUIDANCE: torch.tensor([1.5, 4.0])})
    dropped = loaded.backbone.drop(rows, torch.tensor([True, False]))
    torch.testing.assert_close(dropped[PROMPTS][:1], negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(dropped[POOLED][:1], negative_pooled, rtol=0, atol=1e-6)
    assert dropped[GUIDANCE].tolist() == [1.5, 4.0] and negative.abs().sum() > 0
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = FluxPipeline._pack_latents(x, 2, 16, 4, 4)
        expected = pipe.transformer(
            hidden_states=packed,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=torch.tensor([5.0, 500.0]) / 1000,
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 2, 2, "cpu", torch.float32),
            txt_ids=text_ids,
            guidance=torch.tensor([3.5, 3.5]),
        ).sample
        ours = loaded.backbone.eval()(x, torch.tensor([5.0, 500.0]), cond)
    assert torch.equal(ours, FluxPipeline._unpack_latents(expected, 32, 32, 8))


def _mean_sigmas(process: Any) -> list[float]:
    """Mean σ of t drawn uniformly, by ψ (power_up, the target's) and by ξ (power_down, the bank's), on the
    index axis that objective.power.axis: auto resolves to."""
    from difftune.schedules import noise_level
    from difftune.schedules.base import build_schedule, uniform

    noise = process.noise_levels()
    sigma = noise_level.flow_sigma(noise.log_snr)
    densities = [uniform(1000).probs()]
    densities += [
        build_schedule(name, 1000, 1.0, noise, axis="index").probs() for name in ("power_up", "power_down")
    ]
    return [float((p * sigma).sum()) for p in densities]


def test_training_density_and_sampler_use_fluxs_dynamic_shift(flux_dir: Path) -> None:
    """μ as FluxPipeline computes it for 4 tokens (4x4 latents, 2x2 patches); training draws σ on the grid
    of the static shift e^μ, whose mean under uniform t is 0.5762, and ψ / ξ move it up / down (docs/method.md
    §12); difftune's sampler takes FluxPipeline's steps and latents (with its own, the scheduler's σ grid)."""
    from diffusers import FluxPipeline

    from difftune.process import build_process
    from difftune.process.flow import resolution_mu
    from difftune.sampling.generate import build_scheduler, generate

    loaded = load_pretrained(str(flux_dir))
    mu = resolution_mu(loaded.scheduler_config, loaded.backbone.sample_shape)
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) / (4096 - 256) * (4 - 256), abs=1e-12)
    assert mu == pytest.approx(0.457344, abs=1e-6)
    process = build_process(loaded.scheduler_config, loaded.backbone.sample_shape)
    shift = math.exp(mu)
    assert process.name == "flow" and process.shift == pytest.approx(1.579872, abs=1e-6)
    u = (torch.arange(1000) + 1) / 1000
    torch.testing.assert_close(
        process.sigmas, shift * u / (1 + (shift - 1) * u), rtol=0, atol=1e-6, check_dtype=False
    )
    assert _mean_sigmas(process) == pytest.approx([0.5762, 0.7392, 0.4132], abs=1e-4)  # uniform, ψ, ξ
    # the same model at FluxPipeline's 1024 px (128x128 latents, 4096 tokens): μ = max_shift = 1.15
    large = build_process(loaded.scheduler_config, (16, 128, 128))
    assert large.shift == pytest.approx(math.exp(1.15))
    assert _mean_sigmas(large) == pytest.approx([0.6841, 0.8300, 0.5382], abs=1e-4)
    _, timestep = process.model_input(torch.zeros(3, 16, 4, 4), torch.tensor([0, 499, 999]))
    torch.testing.assert_close(timestep, process.sigmas[[0, 499, 999]].float() * 1000)

    sampler = build_scheduler(
        "DPMSolverMultistepScheduler", loaded.scheduler_config, loaded.backbone.sample_shape
    )
    assert type(sampler).__name__ == "FlowMatchEulerDiscreteScheduler" and sampler.config.use_dynamic_shifting
    cond, _ = loaded.family.sample_conditions(loaded, ConditionRequest(prompts=["a red circle"]))
    pipe = FluxPipeline.from_pretrained(str(flux_dir))
    for true_cfg in (1.0, 2.0):
        ours = generate(
            loaded.backbone.eval(), sampler, cond, [7], guidance_scale=true_cfg, num_inference_steps=3
        )
        grid = torch.tensor([1.0, 2 / 3, 1 / 3])  # FluxPipeline's linspace(1, 1/n, n), shifted by μ
        torch.testing.assert_close(
            sampler.timesteps, 1000 * shift * grid / (1 + (shift - 1) * grid), rtol=0, atol=1e-3
        )
        stock = pipe(
            "a red circle",
            height=32,
            width=32,
            num_inference_steps=3,
            guidance_scale=3.5,  # the guidance embedding
            true_cfg_scale=true_cfg,
            negative_prompt="" if true_cfg > 1 else None,
            generator=torch.Generator().manual_seed(7),
            output_type="latent",
        ).images
        torch.testing.assert_close(pipe.scheduler.timesteps, sampler.timesteps)
        torch.testing.assert_close(ours, FluxPipeline._unpack_latents(stock, 32, 32, 8), **TIGHT)


@pytest.fixture(scope="module")
def full_run(flux_dir: Path, captions: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bank (guidance 2.5) -> a 4-step full Diff-Tuning run, and the same run cut at step 2 and resumed."""
    out = tmp_path_factory.mktemp("full")
    raw = _raw(flux_dir, captions, out)
    config = _write(raw, out / "config.yaml")
    assert main(["bank", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config)]) == 0
    parts = _write(
        _raw(flux_dir, captions, out, train={**raw["train"], "output_dir": str(out / "parts")}),
        out / "p.yaml",
    )
    assert main(["train", "--config", str(parts), "--set", "train.max_steps=2"]) == 0
    assert main(["train", "--config", str(parts), "--set", "train.resume=latest"]) == 0
    return out


def test_the_bank_stores_each_samples_guidance_and_the_cache_keys_the_targets(
    full_run: Path, flux_dir: Path
) -> None:
    loaded = load_pretrained(str(flux_dir))
    bank = load_bank(str(full_run / "bank"), loaded)
    embeds, pooled = loaded.parts.prompts.encode(
        [CAPTIONS[i % 4] for i in range(4)]
    )  # sample i: caption i mod 4
    assert torch.equal(bank[PROMPTS], embeds.half()) and torch.equal(bank[POOLED], pooled.half())
    assert bank[GUIDANCE].float().tolist() == [BANK_GUIDANCE] * 4
    manifest = json.loads((full_run / "bank" / "manifest.json").read_text())
    assert manifest["conditions"] == [PROMPTS, POOLED, GUIDANCE] and manifest["guidance"] == BANK_GUIDANCE
    cache = json.loads((full_run / "cache" / "manifest.json").read_text())
    assert cache["conditions"].startswith("prompts:text-flux:") and cache["conditions"].endswith(
        ":guidance=2.5"
    )


def test_a_full_run_resumes_exactly_and_loads_in_the_stock_pipeline(full_run: Path, flux_dir: Path) -> None:
    from diffusers import FluxPipeline

    whole, resumed = full_run / "run" / "final", full_run / "parts" / "final"
    for sub in ("transformer", "ema/transformer"):
        a, b = _files(whole / sub), _files(resumed / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    rows = [json.loads(line) for line in (full_run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["loss/total"]) and row["loss/bank"] > 0 for row in rows)  # both streams
    pipe = FluxPipeline.from_pretrained(str(whole))
    out = pipe(
        "a red circle",
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    trained = load_trained(str(whole), use_ema=False)
    torch.testing.assert_close(_out(pipe.transformer), _out(trained.backbone.inner), rtol=0, atol=0)
    base = load_pretrained(str(flux_dir)).backbone.inner
    assert (_out(trained.backbone.inner) - _out(base)).abs().max() > 1e-3  # and they trained
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.vae.config.shift_factor == pytest.approx(
        0.1159
    )
    assert trained.backbone.guidance == BANK_GUIDANCE  # the value it trained with, recorded for sampling
    card = (whole / "README.md").read_text()
    assert '--prompt "a photo" --guidance-scale 1' in card and "guidance_scale=2.5" in card


def test_sample_takes_prompts_on_a_full_runs_final(full_run: Path, tmp_path: Path) -> None:
    final = full_run / "run" / "final"
    args = ["sample", "--model", str(final), "--prompt", "a red circle", "--prompt", "a blue square"]
    assert main([*args, "--per-label", "1", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    names = sorted(p.name for p in (tmp_path / "s").glob("0*.png"))
    assert names == ["00000_prompt0_seed0.png", "00001_prompt1_seed1.png"]
    assert np.asarray(Image.open(tmp_path / "s" / names[0])).shape == (32, 32, 3)


@pytest.fixture(scope="module")
def lora_run(
    flux_dir: Path, captions: Path, full_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[list[float]]]:
    """A 4-step LoRA Diff-Tuning run (guidance 4.0) on the full run's bank (made at 2.5), and the same cut at
    step 2 and resumed; the run's folder and the guidance column of each training forward."""
    out = tmp_path_factory.mktemp("lora")
    seen: list[list[float]] = []
    forward = FluxBackbone.forward

    def recording(self, x_t, t, cond):  # type: ignore[no-untyped-def]
        if torch.is_grad_enabled():  # training steps, not the evaluation or the grids
            seen.append(cond[GUIDANCE].float().tolist())
        return forward(self, x_t, t, cond)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FluxBackbone, "forward", recording)
        for name, steps in (
            ("run", []),
            ("parts", ["--set", "train.max_steps=2"]),
            ("parts", ["--set", "train.resume=latest"]),
        ):
            raw = _raw(flux_dir, captions, out, tuning=LORA, bank={"path": str(full_run / "bank")})
            raw["model"]["guidance"] = 4.0
            raw["train"]["output_dir"] = str(out / name)
            assert main(["train", "--config", str(_write(raw, out / f"{name}.yaml")), *steps]) == 0
    return out, seen


def test_bank_rows_train_with_their_stored_guidance_and_target_rows_with_the_configured_one(
    lora_run: tuple[Path, list[list[float]]],
) -> None:
    _, seen = lora_run
    assert seen and all(sorted(row) == [BANK_GUIDANCE, BANK_GUIDANCE, 4.0, 4.0] for row in seen)


def test_a_lora_run_resumes_exactly_and_stock_diffusers_loads_its_lora(
    lora_run: tuple[Path, list[list[float]]], flux_dir: Path
) -> None:
    from diffusers import FluxPipeline

    run, _ = lora_run
    whole, resumed = run / "run" / "final", run / "parts" / "final"
    for sub in ("adapter", "ema/adapter"):
        a, b = load_file(str(whole / sub / LORA_WEIGHTS)), load_file(str(resumed / sub / LORA_WEIGHTS))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
        assert all(key.startswith("transformer.") for key in a)
    # diffusers' Flux LoRA targets: both streams' attention projections and the double blocks' feed-forwards
    keys = load_file(str(whole / "adapter" / LORA_WEIGHTS)).keys()
    for module in (
        "attn.add_q_proj",
        "attn.to_out.0",
        "ff_context.net.2",
        "single_transformer_blocks.0.attn.to_q",
    ):
        assert any(f"{module}.lora_A" in key for key in keys), module
    base = _out(load_pretrained(str(flux_dir)).backbone.inner)
    for use_ema, sub in ((True, "ema/adapter"), (False, "adapter")):
        ours = _out(load_trained(str(whole), use_ema=use_ema).backbone.inner)
        pipe = FluxPipeline.from_pretrained(str(flux_dir))
        pipe.load_lora_weights(str(whole / sub))
        stock = _out(pipe.transformer)
        torch.testing.assert_close(stock, ours, **TIGHT)
        assert (stock - base).abs().max() > 1e3 * TIGHT["atol"]  # the LoRA is on, at its trained scale
    assert load_trained(str(whole)).backbone.guidance == 4.0  # the adapter's base samples with its value
    card = (whole / "README.md").read_text()
    assert (
        "FluxPipeline.from_pretrained" in card and "load_lora_weights" in card and "guidance_scale=4" in card
    )


def test_sample_takes_prompts_on_a_lora_runs_final(
    lora_run: tuple[Path, list[list[float]]], tmp_path: Path
) -> None:
    final = lora_run[0] / "run" / "final"
    args = ["sample", "--model", str(final), "--prompt", "a red circle", "--per-label", "1"]
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "00000_prompt0_seed0.png").is_file()


def test_a_checkpointed_lora_run_on_a_bf16_base_trains_as_the_recipe_sets_it(
    flux_dir: Path, captions: Path, tmp_path: Path, fresh_accelerate: None
) -> None:
    raw = _raw(flux_dir, captions, tmp_path, tuning=LORA, objective={"bank_share": 0.0})
    raw["train"].update(
        gradient_checkpointing=True, frozen_dtype="bfloat16", mixed_precision="bf16", max_steps=2
    )
    seen: list[tuple[bool, torch.dtype]] = []
    forward = FluxBackbone.forward

    def recording(self, x_t, t, cond):  # type: ignore[no-untyped-def]
        seen.append(
            (
                self.inner.gradient_checkpointing,
                self.inner.transformer_blocks[0].attn.to_q.base_layer.weight.dtype,
            )
        )
        return forward(self, x_t, t, cond)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FluxBackbone, "forward", recording)
        assert main(["train", "--config", str(_write(raw, tmp_path / "c.yaml"))]) == 0
    assert seen and set(seen) == {(True, torch.bfloat16)}
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["frozen_dtypes"] == ["bfloat16"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(row["loss/total"]) for row in rows)


def test_the_dry_run_checks_a_flux_run_and_states_its_memory(
    flux_dir: Path, captions: Path, full_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _raw(flux_dir, captions, tmp_path, tuning=LORA, bank={"path": str(full_run / "bank")})
    raw["train"]["gradient_checkpointing"] = True
    config = _write(raw, tmp_path / "config.yaml")
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "FluxTransformer2DModel" in out
        and "guidance (a guidance embedding: model.guidance" in out
        and "memory     about" in out
    )
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ recipes
# tests/test_recipes.py checks the twins, bf16 and checkpointing, the quoted memory (FLUX.1-dev's published
# configs in benchmarks/recipe_memory.py) and the dry runs on this tiny pipeline; here: what is Flux's own


@pytest.mark.parametrize("name", ["flux1_dev_lora", "flux1_dev_lora_plain"])
def test_the_flux_recipes_set_the_guidance_embedding_and_no_true_cfg(name: str) -> None:
    from difftune.config.experiment import load_config

    cfg = load_config(ROOT / "configs" / "recipes" / f"{name}.yaml")
    assert cfg.model.pretrained == "black-forest-labs/FLUX.1-dev" and cfg.model.guidance == 3.5
    assert cfg.tuning.method == "lora" and cfg.tuning.lora.targets is None  # the family's Flux targets
    assert cfg.objective.cfg_dropout == 0.0  # dev samples without an unconditional branch
    if cfg.bank_count:
        assert cfg.bank.sampling.scheduler == "FlowMatchEulerDiscreteScheduler"
        assert cfg.bank.sampling.guidance_scale == 1.0  # FluxPipeline's: no true CFG, the guidance embedding
