"""Every forward process end to end on a tiny model: its sampler reaches the data, and bank -> Diff-Tuning
-> exact resume -> sample -> stock load runs for DDPM, rectified flow and EDM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from difftune.backbones import Conditioning, load_pretrained
from difftune.bank import generate_bank
from difftune.cli import main
from difftune.process import DEFAULT_SAMPLERS, build_process
from difftune.sampling.generate import build_scheduler, generate
from difftune.schedules.ports import RECOMMENDED_AXIS, resolve_port
from difftune.testing.models import tiny_dit, tiny_unet
from difftune.training.loop import Trainer
from test_training import assert_all_equal, changed, make_cfg, metrics, weights

SCHEDULERS = {
    "ddpm": DDPMScheduler(),
    "flow": FlowMatchEulerDiscreteScheduler(shift=3.0),
    "edm": EDMEulerScheduler(),
}


def _config(name: str) -> dict:
    scheduler = SCHEDULERS[name]
    return {"_class_name": type(scheduler).__name__, **dict(scheduler.config)}


class _Oracle:
    """A denoiser that knows the answer is ``x0``: its raw output at (input, time) is exactly what the
    process's training target would be, derived from what the sampler feeds it."""

    def __init__(self, name: str, x0: torch.Tensor) -> None:
        self.name, self.x0, self.sample_shape = name, x0, tuple(x0.shape[1:])
        self.process = build_process(_config(name))

    def __call__(self, x_in: torch.Tensor, time: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x0 = self.x0.expand_as(x_in).double()
        x_in, time = x_in.double(), time.double().view(-1, 1, 1, 1)
        if self.name == "ddpm":  # time is the index: ε = (x_t − √ᾱ x0) / √(1 − ᾱ)
            abar = self.process.alphas_cumprod.double()[time.long().flatten()].view(-1, 1, 1, 1)
            return ((x_in - abar.sqrt() * x0) / (1 - abar).sqrt()).float()
        if self.name == "flow":  # time is σ·T: v = ε − x0 = (x_t − x0) / σ
            sigma = time / self.process.num_timesteps
            return ((x_in - x0) / sigma).float()
        sigma, sd = (4 * time).exp(), self.process.sigma_data  # time is ln(σ)/4, the input c_in·x
        x_t = x_in * (sigma**2 + sd**2).sqrt()
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        return ((x0 - c_skip * x_t) / c_out).float()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_each_process_sampler_reaches_the_data(name: str) -> None:
    x0 = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)
    oracle = _Oracle(name, x0)
    scheduler = build_scheduler(
        "DPMSolverMultistepScheduler", _config(name)
    )  # the default: mapped per process
    assert type(scheduler).__name__ == DEFAULT_SAMPLERS[name]
    cond = Conditioning({"labels": torch.zeros(2, dtype=torch.long)})
    samples = generate(oracle, scheduler, cond, seeds=[0, 1], num_inference_steps=12)
    torch.testing.assert_close(samples, x0.expand(2, -1, -1, -1), rtol=0, atol=2e-3)


def _base(name: str, root: Path) -> Path:
    model = tiny_dit(learn_sigma=name == "ddpm") if name != "edm" else tiny_unet()
    model.save_pretrained(root / ("unet" if name == "edm" else "transformer"))
    SCHEDULERS[name].save_pretrained(root / "scheduler")
    return root


@pytest.mark.parametrize("name", ["flow", "edm"])
def test_bank_diff_tuning_resume_sample_and_stock_load(name: str, tmp_path: Path) -> None:
    base = _base(name, tmp_path / "base")
    bank = tmp_path / "bank"
    args = ("train.max_steps=4", "train.checkpoint_every=2", "train.learning_rate=1e-3")
    cfg = make_cfg(base, tmp_path / "a", bank, *args)
    generate_bank(load_pretrained(str(base)), cfg.bank, progress=False)
    manifest = json.loads((bank / "manifest.json").read_text())
    assert manifest["noise_schedule"]["_class_name"] == type(SCHEDULERS[name]).__name__
    assert manifest["scheduler"] == DEFAULT_SAMPLERS[name]  # the sampler that ran, not the one asked for

    whole = Trainer(cfg).train()
    # the run records the port objective.power.axis: auto chose for its process, not "auto"
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    ran = resolve_port(cfg.objective, name)
    assert (
        cfg.objective.power.axis == "auto" and saved["objective"]["power"]["axis"] == ran.power.axis != "auto"
    )
    offsets = RECOMMENDED_AXIS[name] == "offsets"  # saved as the noise-level schedules themselves
    expected = ("logit_normal_up", "logit_normal_down") if offsets else ("power_up", "power_down")
    assert (saved["objective"]["target_schedule"], saved["objective"]["bank_schedule"]) == expected
    Trainer(make_cfg(base, tmp_path / "b", bank, *args[1:], "train.max_steps=2")).train()
    resumed = Trainer(make_cfg(base, tmp_path / "b", bank, *args, "train.resume=latest")).train()
    sub = "unet" if name == "edm" else "transformer"
    assert_all_equal(weights(whole, sub), weights(resumed, sub))
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert all(torch.isfinite(torch.tensor(m["loss/total"])) for m in metrics(tmp_path / "a"))
    assert changed(weights(whole, sub), weights(base, sub)) > 0  # it trained

    out = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "--model",
                str(whole),
                "--labels",
                "0,1",
                "--per-label",
                "2",
                "--steps",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads((out / "difftune_samples.json").read_text())
    assert (
        len(record["images"]) == 4
        and record["noise_schedule"]["_class_name"] == type(SCHEDULERS[name]).__name__
    )

    stock = type(SCHEDULERS[name]).from_pretrained(str(whole), subfolder="scheduler")  # the stock loader
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert type(stock) is type(SCHEDULERS[name]) and public(stock.config) == public(SCHEDULERS[name].config)
    assert not (whole / "model_index.json").exists()


def test_a_dynamic_shift_is_fixed_for_the_sample_size_as_diffusers_does() -> None:
    """Flux's resolution-dependent shift: μ from the token count, the training σ grid of the fixed shift
    e^μ, and a sampler that takes ``FluxPipeline``'s steps: σ = linspace(1, 1/n, n) through diffusers'
    own dynamic scheduler with ``set_timesteps(sigmas=..., mu=μ)``."""
    import math

    from difftune.errors import UserError
    from difftune.process.flow import fixed_shift

    dynamic = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}
    shape = (16, 64, 64)  # 32 x 32 = 1024 tokens of 2x2 patches
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)
    fixed = fixed_shift(dynamic, shape)
    assert not fixed["use_dynamic_shifting"] and fixed["shift"] == pytest.approx(math.exp(mu), rel=1e-12)
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20).tolist(), mu=mu)
    ours = build_scheduler("FlowMatchEulerDiscreteScheduler", dynamic, shape)
    ours.set_timesteps(20)
    torch.testing.assert_close(ours.sigmas, reference.sigmas, rtol=0, atol=0)
    process = build_process(dynamic, shape)
    static = build_process({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": math.exp(mu)})
    torch.testing.assert_close(process.sigmas, static.sigmas, rtol=1e-12, atol=0)
    assert (
        process.sigmas.mean()
        > build_process({"_class_name": "FlowMatchEulerDiscreteScheduler"}).sigmas.mean()
    )  # e^μ > 1 moves σ toward noise
    with pytest.raises(UserError, match="depends on the resolution"):
        build_process(dynamic)


def test_a_flow_model_with_a_dynamic_shift_trains_samples_and_keeps_its_config(tmp_path: Path) -> None:
    base = tmp_path / "base"
    tiny_dit(learn_sigma=False).save_pretrained(base / "transformer")
    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).save_pretrained(base / "scheduler")
    bank = tmp_path / "bank"
    cfg = make_cfg(base, tmp_path / "run", bank, "train.max_steps=2", "train.checkpoint_every=0")
    generate_bank(load_pretrained(str(base)), cfg.bank, progress=False)
    final = Trainer(cfg).train()
    saved = json.loads((final / "scheduler" / "scheduler_config.json").read_text())
    assert saved["use_dynamic_shifting"] is True  # stock loaders fix μ per resolution themselves
    out = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "--model",
                str(final),
                "--labels",
                "0",
                "--per-label",
                "1",
                "--steps",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "00000_label0_seed0.png").is_file()
