"""min-SNR-γ and inverse-SNR (x0 supervision) as schedules of the target stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from difftune.config.experiment import ConfigError, ObjectiveConfig
from difftune.errors import UserError
from difftune.objectives import DiffTuningLoss
from difftune.objectives.base import Draw
from difftune.process import build_process
from difftune.schedules.base import NoiseLevels, build_schedule, uniform
from difftune.training.loop import Trainer
from test_training import make_cfg, metrics

T = 1000


def _noise(prediction_type: str = "epsilon") -> NoiseLevels:
    return build_process(
        DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type).config
    ).noise_levels()


@pytest.mark.parametrize(
    "prediction_type,factor",
    [
        ("epsilon", lambda snr: 1 / snr),
        ("v_prediction", lambda snr: 1 / (snr + 1)),
        ("sample", lambda snr: torch.ones_like(snr)),
    ],
)
def test_the_weights_are_the_published_formulas(prediction_type: str, factor) -> None:
    noise = _noise(prediction_type)
    abar = DDPMScheduler(num_train_timesteps=T).alphas_cumprod.double()
    snr = abar / (1 - abar)
    assert torch.equal(noise.snr, snr)
    for schedule, x0_weight in [
        (build_schedule("min_snr", T, noise=noise, snr_gamma=5.0), snr.clamp(max=5.0)),
        (build_schedule("inverse_snr", T, noise=noise), torch.ones_like(snr)),
    ]:
        expected = x0_weight * factor(snr)
        torch.testing.assert_close(schedule.probs(), expected / expected.sum(), rtol=1e-12, atol=0)
        assert schedule.weights().mean().item() == pytest.approx(1.0)


def test_inverse_snr_turns_the_epsilon_loss_into_the_x0_loss() -> None:
    process = build_process(DDPMScheduler(num_train_timesteps=T).config)
    objective = DiffTuningLoss(
        process,
        build_schedule("inverse_snr", T, noise=_noise()),
        uniform(T),
        realisation="weight",
        cfg_dropout=0.0,
    )
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    draw = Draw(
        t,
        torch.randn(6, 1, 4, 4, generator=g),
        torch.zeros(6, dtype=torch.bool),
        torch.zeros(6, dtype=torch.bool),
    )
    prediction = torch.randn(6, 1, 4, 4, generator=g)
    terms = objective(lambda x_t, t, cond: prediction, x0, None, torch.zeros(6, dtype=torch.bool), draw)
    x_t, _, _ = objective.noised(x0, draw)
    x0_hat = process.x0(prediction, x_t, t)
    x0_loss = (x0_hat - x0).pow(2).flatten(1).mean(1)
    ratio = terms.loss / x0_loss  # one constant: the table's normalisation
    torch.testing.assert_close(ratio, ratio[:1].expand(6), rtol=1e-4, atol=0)


def test_snr_schedules_are_checked() -> None:
    with pytest.raises(UserError, match="needs the model's 1000 noise levels"):
        build_schedule("min_snr", T)
    with pytest.raises(ConfigError, match="objective.snr_gamma=0.0 must be > 0"):
        ObjectiveConfig(target_schedule="min_snr", snr_gamma=0.0)
    assert ObjectiveConfig(target_schedule="inverse_snr").target_schedule == "inverse_snr"


def test_a_run_with_min_snr_on_the_target_stream(dit_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(
        make_cfg(dit_dir, run, None, "objective.target_schedule=min_snr", "objective.realisation=weight")
    ).train()
    assert all(m["loss/total"] > 0 for m in metrics(run))
