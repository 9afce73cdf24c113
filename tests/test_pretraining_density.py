"""The density a flow model was pre-trained with (``model.pretraining_density``): SD3's logit-normal as
diffusers' SD3 scripts draw it, what ``auto`` resolves to per family, the ``pretraining`` schedule (plain
fine-tuning as the model was trained), the ``offsets`` port's centre, and a run that records it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from difftune.cli import main
from difftune.errors import UserError
from difftune.process import build_process, resolve_pretraining
from difftune.process.schedulers import make_scheduler
from difftune.schedules.base import build_schedule
from difftune.testing.sd3 import save_sd3_pipeline

SD3_LOGIT_NORMAL_MEAN_SIGMA = 0.7145  # mean σ of flow with shift 3 under logit-normal(0, 1) time
SHIFT_3_UNIFORM_MEAN_SIGMA = 0.677  # the same under a uniform index (docs/method.md §8)


def _flow(shift: float = 3.0) -> dict:
    return {**make_scheduler("flow", shift=shift).config, "_class_name": "FlowMatchEulerDiscreteScheduler"}


def test_logit_normal_is_the_density_diffusers_sd3_scripts_draw() -> None:
    from diffusers.training_utils import compute_density_for_timestep_sampling

    process = build_process(_flow(), pretraining="logit_normal")
    density = process.pretraining_density()
    assert density.sum().item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(density, density.flip(0))  # symmetric in time
    torch.manual_seed(0)
    u = compute_density_for_timestep_sampling("logit_normal", 400_000, logit_mean=0.0, logit_std=1.0)
    drawn = (
        999 - (u * 1000).long()
    )  # diffusers indexes the descending timesteps; difftune's 0 is the least noisy
    counts = torch.bincount(drawn // 50, minlength=20).double() / drawn.numel()
    assert (counts - density.view(20, 50).sum(1)).abs().sum() / 2 < 0.005  # total variation over 20 bins
    assert (density * process.sigmas).sum().item() == pytest.approx(SD3_LOGIT_NORMAL_MEAN_SIGMA, abs=5e-4)
    sigma = 1 - (1000 - drawn - 1) / 1000
    assert (3 * sigma / (1 + 2 * sigma)).mean().item() == pytest.approx(SD3_LOGIT_NORMAL_MEAN_SIGMA, abs=2e-3)


def test_uniform_and_auto_keep_a_uniform_index() -> None:
    for choice in ("auto", "uniform"):
        density = build_process(_flow(), pretraining=choice).pretraining_density()
        torch.testing.assert_close(density, torch.full((1000,), 1e-3, dtype=torch.float64))


def test_auto_resolves_to_the_familys_density_and_other_processes_keep_their_own() -> None:
    assert resolve_pretraining("auto", _flow(), "logit_normal") == "logit_normal"
    assert resolve_pretraining("uniform", _flow(), "logit_normal") == "uniform"
    assert resolve_pretraining("auto", _flow(), "uniform") == "uniform"
    ddpm = dict(make_scheduler().config)
    assert resolve_pretraining("auto", ddpm, "uniform") == "auto"
    with pytest.raises(UserError, match="model.pretraining_density=logit_normal describes a flow model"):
        resolve_pretraining("logit_normal", ddpm, "uniform")
    with pytest.raises(UserError, match="pre-training density 'lognormal' is unknown"):
        build_process(_flow(), pretraining="lognormal")


def test_families_state_their_density() -> None:
    from difftune.backbones import FAMILIES

    assert FAMILIES["stable_diffusion_3"].pretraining_density == "logit_normal"
    assert FAMILIES["sd3_controlnet"].pretraining_density == "logit_normal"
    assert FAMILIES["flux"].pretraining_density == "uniform"
    assert FAMILIES["stable_diffusion"].pretraining_density == "uniform"


def test_the_pretraining_schedule_draws_the_models_own_density() -> None:
    for process in (
        build_process(_flow(), pretraining="logit_normal"),
        build_process(dict(make_scheduler("edm", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5).config)),
    ):
        schedule = build_schedule("pretraining", 1000, noise=process.noise_levels())
        torch.testing.assert_close(schedule.probs(), process.pretraining_density())
    uniform = build_process(_flow())
    plain = build_schedule("pretraining", 1000, noise=uniform.noise_levels())
    assert (plain.probs() * uniform.sigmas).sum().item() == pytest.approx(
        SHIFT_3_UNIFORM_MEAN_SIGMA, abs=5e-4
    )


def test_the_offsets_port_centres_on_the_stated_density() -> None:
    """``logit_normal_up/down`` move SD3's logit-normal density by their offset in logit σ."""
    process = build_process(_flow(), pretraining="logit_normal")
    schedules = [
        build_schedule(n, 1000, noise=process.noise_levels())
        for n in ("logit_normal_up", "logit_normal_down")
    ]
    logit = torch.logit(process.sigmas).clamp(max=20.0)  # σ = 1 at the last index
    centre = (process.pretraining_density() * logit).sum().item()
    up, down = ((s.probs() * logit).sum().item() for s in schedules)
    # the shift-3 grid: logit σ = logit u + ln 3, u ~ logit-normal(0, 1)
    assert centre == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=0.01)
    assert up - centre == pytest.approx(1.1, abs=0.05) and centre - down == pytest.approx(1.1, abs=0.05)


def test_an_sd3_run_trains_with_and_records_the_logit_normal_density(captions: Path, tmp_path: Path) -> None:
    root = save_sd3_pipeline(tmp_path / "pipe")
    out = tmp_path / "run"
    raw = {
        "model": {"pretrained": str(root)},
        "data": {"source": "captions", "path": str(captions), "cache_dir": str(tmp_path / "cache")},
        "objective": {"target_schedule": "pretraining", "bank_share": 0.0},
        "train": {
            "output_dir": str(out),
            "batch_size": 2,
            "max_steps": 1,
            "sample_every": 0,
            "ema_decay": 0.0,
        },
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["pretraining_density"] == "logit_normal"
    assert (
        main(["train", "--config", str(config), "--set", "model.pretraining_density=uniform", "--dry-run"])
        == 0
    )
