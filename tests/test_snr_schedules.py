"""min-SNR-γ and inverse-SNR (x0 supervision) as schedules of the target stream, on every process and
prediction target (docs/method.md §8)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from difftune.config.experiment import ConfigError, ObjectiveConfig
from difftune.config.objective import MinSNRSchedule
from difftune.errors import UserError
from difftune.objectives import DiffTuningLoss
from difftune.objectives.base import Draw
from difftune.process import build_process
from difftune.schedules.base import NoiseLevels, build_schedule, uniform
from difftune.schedules.noise_level import flow_sigma
from difftune.training.loop import Trainer
from test_training import make_cfg, metrics

T = 1000
PROCESSES = {
    "ddpm-epsilon": DDPMScheduler(),
    "ddpm-v": DDPMScheduler(prediction_type="v_prediction"),
    "ddpm-sample": DDPMScheduler(prediction_type="sample"),
    "flow": FlowMatchEulerDiscreteScheduler(),
    "flow-shift3": FlowMatchEulerDiscreteScheduler(shift=3.0),
    "edm": EDMEulerScheduler(),
}


def _process(name: str):
    scheduler = PROCESSES[name]
    return build_process({"_class_name": type(scheduler).__name__, **scheduler.config})


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
    with pytest.raises(ConfigError, match="objective.min_snr.gamma=0.0 must be > 0"):
        ObjectiveConfig(target_schedule="min_snr", min_snr=MinSNRSchedule(gamma=0.0))
    assert ObjectiveConfig(target_schedule="inverse_snr").target_schedule == "inverse_snr"


def test_a_run_with_min_snr_on_the_target_stream(dit_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(
        make_cfg(dit_dir, run, None, "objective.target_schedule=min_snr", "objective.realisation=weight")
    ).train()
    assert all(m["loss/total"] > 0 for m in metrics(run))


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_the_x0_factor_is_the_squared_slope_of_x0_in_the_prediction(name: str) -> None:
    process = _process(name)
    t = torch.arange(T)
    zeros = torch.zeros(T, 1, 1, 1, dtype=torch.float64)
    slope = process.x0(zeros + 1, zeros, t) - process.x0(zeros, zeros, t)  # x0 is affine in the prediction
    torch.testing.assert_close(process.x0_factor(), slope.flatten() ** 2, rtol=1e-10, atol=0)
    snr = process.snr()
    if name == "ddpm-v":
        torch.testing.assert_close(snr.clamp(max=5.0) * process.x0_factor(), snr.clamp(max=5.0) / (snr + 1))
    if name.startswith("flow"):  # ‖v̂ − v‖² = (1 + √SNR)²·‖x̂0 − x0‖²
        torch.testing.assert_close(1 / process.x0_factor(), (1 + snr.sqrt()) ** 2, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_min_snr_is_min_snr_gamma_over_snr_of_the_epsilon_loss_on_every_process(name: str) -> None:
    """Under ``weight``, min-SNR-γ turns the model's own loss into min(SNR, γ)·(x0 loss) = min(SNR, γ)/SNR·(ε loss),
    and inverse-SNR into the x0 loss, each up to the one constant of the table's normalisation."""
    process = _process(name)
    noise = process.noise_levels()
    g = torch.Generator().manual_seed(0)
    x0, noise_draw = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 200, 400, 600, 800, 990, 998])
    prediction = torch.randn(8, 1, 4, 4, generator=g)
    x_t = process.noised(x0, noise_draw, t)
    x0_hat = process.x0(prediction, x_t, t)
    ones = torch.ones(1, 1, 1, 1)
    a = torch.stack([process.noised(ones, 0 * ones, t[i : i + 1]) for i in range(8)]).flatten()
    s = torch.stack([process.noised(0 * ones, ones, t[i : i + 1]) for i in range(8)]).flatten()
    eps_hat = (x_t - a.view(-1, 1, 1, 1) * x0_hat) / s.view(-1, 1, 1, 1)
    mse = lambda u, v: (u - v).double().pow(2).flatten(1).mean(1)  # noqa: E731
    snr = noise.snr[t]
    for kind, expected in [
        ("min_snr", snr.clamp(max=5.0) / snr * mse(eps_hat, noise_draw)),
        ("min_snr", snr.clamp(max=5.0) * mse(x0_hat, x0)),
        ("inverse_snr", mse(x0_hat, x0)),
    ]:
        schedule = build_schedule(kind, T, noise=noise, snr_gamma=5.0)
        objective = DiffTuningLoss(process, schedule, uniform(T), realisation="weight", cfg_dropout=0.0)
        draw = Draw(t, noise_draw, torch.zeros(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool))
        loss = objective(lambda *_: prediction, x0, None, draw.bank, draw).loss.double()
        ratio = loss / expected
        torch.testing.assert_close(ratio, ratio[:1].expand(8), rtol=2e-4, atol=0)


def test_min_snr_and_inverse_snr_are_finite_where_flow_is_pure_noise() -> None:
    noise = _process("flow").noise_levels()
    assert noise.snr[-1] == 0 and noise.log_snr[-1] == float("-inf")
    assert build_schedule("min_snr", T, noise=noise).weights()[-1] == 0  # min(0, γ)·σ² = 0
    inverse = build_schedule("inverse_snr", T, noise=noise).weights()
    assert torch.isfinite(inverse).all() and inverse.argmax() == T - 1  # σ² is largest at σ = 1


def test_which_end_snr_weightings_lean_to_depends_on_the_target() -> None:
    """Mean σ_flow of each density (docs/method.md §8): inverse-SNR leans toward noise wherever the target is not x0
    itself (there it is uniform); min-SNR-γ leans toward noise only for ε: for v, the velocity, x0 and EDM's F it caps
    the high-noise end too, and leans toward data."""
    measured = {}
    for name in sorted(PROCESSES):
        noise = _process(name).noise_levels()
        sigma = flow_sigma(noise.log_snr)
        measured[name] = [
            round(float((probs * sigma).sum()), 3)
            for probs in (
                uniform(T).probs(),
                build_schedule("min_snr", T, noise=noise).probs(),
                build_schedule("inverse_snr", T, noise=noise).probs(),
            )
        ]
    assert measured == {
        "ddpm-epsilon": [0.693, 0.746, 0.987],
        "ddpm-v": [0.693, 0.448, 0.822],
        "ddpm-sample": [0.693, 0.276, 0.693],
        "edm": [0.415, 0.338, 0.769],
        "flow": [0.501, 0.405, 0.75],
        "flow-shift3": [0.677, 0.464, 0.83],
    }


def test_a_zero_snr_epsilon_model_gets_the_min_snr_limit_and_a_clear_inverse_snr_refusal() -> None:
    """With rescale_betas_zero_snr the last step has SNR 0: min-SNR's weight SNR·(1/SNR) is 1 there (its
    limit, as at every SNR below γ for ε), and inverse-SNR's 1/SNR is infinite, refused in one line."""
    zero = build_process(
        {"_class_name": "DDPMScheduler", **DDPMScheduler(rescale_betas_zero_snr=True).config}
    ).noise_levels()
    assert zero.snr[-1] == 0
    gamma = 5.0
    schedule = build_schedule("min_snr", 1000, noise=zero, snr_gamma=gamma)
    weights = schedule.probs() * 1000
    expected = torch.where(zero.snr <= gamma, torch.ones_like(zero.snr), gamma / zero.snr)
    torch.testing.assert_close(weights, expected / expected.mean(), rtol=1e-12, atol=0)
    with pytest.raises(UserError, match="infinite at this schedule's zero-SNR step"):
        build_schedule("inverse_snr", 1000, noise=zero)
