"""The forward-process contract, over every process: index 0 is the least noisy, noising and x0 round-trip,
the maths agrees with diffusers' own schedulers, and ψ/ξ tilt toward noise/data on every process."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from difftune.errors import UserError
from difftune.objectives.diff_tuning import DiffTuningLoss
from difftune.process import SCHEDULER_CLASSES, build_process, process_name
from difftune.process.edm import P_MEAN
from difftune.schedules.base import power_down, power_up, uniform


def _config(scheduler) -> dict:
    return {"_class_name": type(scheduler).__name__, **dict(scheduler.config)}


PROCESSES = {
    "ddpm-epsilon": _config(DDPMScheduler()),
    "ddpm-v": _config(DDPMScheduler(prediction_type="v_prediction")),
    "ddpm-sample": _config(DDPMScheduler(prediction_type="sample")),
    "flow": _config(FlowMatchEulerDiscreteScheduler()),
    "flow-shift3": _config(FlowMatchEulerDiscreteScheduler(shift=3.0)),
    "edm": _config(EDMEulerScheduler()),
}


@pytest.fixture(params=sorted(PROCESSES))
def process(request: pytest.FixtureRequest):
    return build_process(PROCESSES[request.param])


def _batch(n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1, torch.randn(
        n, 2, 4, 4, generator=g, dtype=torch.float64
    )


def test_index_0_is_the_least_noisy_and_the_last_the_most(process) -> None:
    log_snr = process.log_snr()
    assert log_snr.shape == (process.num_timesteps,) and log_snr.dtype == torch.float64
    assert (log_snr.diff() < 0).all()  # strictly more noise as t grows
    x0, noise = _batch()
    t = torch.tensor([0, process.num_timesteps - 1]).repeat_interleave(torch.tensor([3, 2]))
    x_t = process.noised(x0, noise, t)
    clean, noisy = (x_t[:3] - x0[:3]).abs().max(), x_t[3:]
    assert clean < 0.05  # the least noisy index is almost the data
    corr = torch.nn.functional.cosine_similarity(noisy.flatten(1), noise[3:].flatten(1))
    assert (corr > 0.99).all()  # the noisiest index is almost pure noise


def test_the_x0_of_the_target_is_the_data(process) -> None:
    x0, noise = _batch()
    t = torch.tensor([0, 10, 250, 700, process.num_timesteps - 1])
    x_t = process.noised(x0, noise, t)
    recovered = process.x0(process.target(x0, noise, t), x_t, t)
    torch.testing.assert_close(recovered, x0, rtol=0, atol=1e-4)


def test_the_model_gets_a_sample_of_its_shape_and_one_time_per_row(process) -> None:
    x0, noise = _batch()
    t = torch.tensor([0, 1, 2, 3, 4])
    x_in, time = process.model_input(process.noised(x0, noise, t), t)
    assert x_in.shape == x0.shape and time.shape == (5,)
    assert (time.diff() > 0).all()  # the time a model sees grows with the noise
    assert process.has_variance_term is (process.name == "ddpm")


def test_diff_tuning_tilts_toward_noise_and_retention_toward_data_on_every_process(process) -> None:
    """The commonest flow-matching bug elsewhere is an inverted convention: ψ must favour noise."""
    T = process.num_timesteps
    noise_level = 1 - process.equivalent_alphas_cumprod()  # sigmoid(-log SNR): finite where SNR = 0

    def mean_noise(schedule) -> float:
        return float((schedule.probs() * noise_level).sum())

    assert mean_noise(power_down(T, 1.0)) < mean_noise(uniform(T)) < mean_noise(power_up(T, 1.0))


def test_ddpm_is_diffusers_ddpm() -> None:
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    process = build_process(_config(scheduler))
    x0, noise = (a.float() for a in _batch())
    t = torch.tensor([0, 10, 250, 700, 999])
    assert torch.equal(process.noised(x0, noise, t), scheduler.add_noise(x0, noise, t))
    assert torch.equal(process.target(x0, noise, t), scheduler.get_velocity(x0, noise, t))
    x_in, time = process.model_input(x0, t)
    assert x_in is x0 and time is t  # the index itself, as every DDPM model was trained


def test_flow_shift_adds_ln_s_to_logit_sigma_and_the_model_sees_sigma_times_T() -> None:
    plain, shifted = (build_process(PROCESSES[name]) for name in ("flow", "flow-shift3"))
    u = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    torch.testing.assert_close(plain.sigmas, u, rtol=0, atol=1e-6)
    logit = lambda s: (s / (1 - s)).log()  # noqa: E731
    inside = slice(0, 999)  # σ = 1 at the last index has no logit
    torch.testing.assert_close(
        logit(shifted.sigmas[inside]) - logit(plain.sigmas[inside]),
        torch.full((999,), math.log(3.0), dtype=torch.float64),
        rtol=0,
        atol=1e-3,  # diffusers computes σ in float32, and logit magnifies its rounding near σ = 1
    )
    t = torch.tensor([0, 499, 999])
    _, time = shifted.model_input(torch.zeros(3, 1, 2, 2), t)
    torch.testing.assert_close(time, (shifted.sigmas[t] * 1000).float())


def test_edm_preconditioning_is_diffusers_edm_and_its_density_centres_on_p_mean() -> None:
    scheduler = EDMEulerScheduler()
    process = build_process(_config(scheduler))
    x0, noise = (a.float() for a in _batch())
    t = torch.tensor([0, 10, 250, 700, 999])
    x_t = process.noised(x0, noise, t)
    sigma = process.sigmas[t].float().view(-1, 1, 1, 1)
    x_in, time = process.model_input(x_t, t)
    torch.testing.assert_close(x_in, scheduler.precondition_inputs(x_t, sigma))
    torch.testing.assert_close(time, scheduler.precondition_noise(process.sigmas[t].float()))
    output = torch.randn_like(x0)
    torch.testing.assert_close(process.x0(output, x_t, t), scheduler.precondition_outputs(x_t, output, sigma))
    density = process.pretraining_density()
    assert abs(float((density * process.sigmas.log()).sum()) - P_MEAN) < 0.05


@pytest.mark.parametrize("name", ["flow", "edm"])
def test_the_objective_trains_through_the_process(name: str) -> None:
    process = build_process(PROCESSES[name])
    objective = DiffTuningLoss(process, power_up(1000), power_down(1000), cfg_dropout=0.0)
    x0 = torch.rand(4, 2, 4, 4) * 2 - 1
    draw = objective.draw(3, 1, (2, 4, 4), torch.Generator().manual_seed(0))
    seen = {}

    def oracle(x_in: torch.Tensor, time: torch.Tensor, cond: object) -> torch.Tensor:
        seen["time"] = time
        return process.target(x0, draw.noise, draw.t)  # the exact regression target

    terms = objective(oracle, x0, None, draw.bank, draw)
    torch.testing.assert_close(terms.terms["mse"], torch.zeros(4), rtol=0, atol=1e-10)
    torch.testing.assert_close(seen["time"], process.model_input(x0, draw.t)[1])
    with pytest.raises(ValueError, match="has no variance term"):
        DiffTuningLoss(process, power_up(1000), power_down(1000), learn_variance=True)


def test_a_scheduler_class_is_mapped_to_its_process_or_refused_by_name() -> None:
    assert process_name(_config(DDIMScheduler())) == "ddpm"
    assert process_name({"num_train_timesteps": 1000}) == "ddpm"  # no class: difftune's default schedule
    assert process_name(_config(FlowMatchEulerDiscreteScheduler())) == "flow"
    assert process_name(_config(EDMEulerScheduler())) == "edm"
    assert process_name({"_class_name": "LCMScheduler", "beta_schedule": "scaled_linear"}) == "ddpm"
    with pytest.raises(UserError, match=r"'SomeScheduler' names no forward process .*valid: DDPMScheduler"):
        process_name({"_class_name": "SomeScheduler", "sigma_max": 1.0})
    assert all(classes for classes in SCHEDULER_CLASSES.values())


SAMPLERS = [
    (name, sampler) for name in sorted(PROCESSES) for sampler in SCHEDULER_CLASSES[name.split("-")[0]]
]


@pytest.mark.parametrize(("name", "sampler"), SAMPLERS, ids=[f"{n}-{s}" for n, s in SAMPLERS])
def test_every_sampler_walks_from_the_noise_end_to_the_data_end(name: str, sampler: str) -> None:
    """The noise-end convention of sampling, for every sampler class of every process: the steps run from
    the noisy end to the clean end (never back up; second-order samplers repeat a step), start near pure
    noise and end near the data (log-SNR of the first step < -3, of the last > 2, on the training grid)."""
    from difftune.sampling.generate import build_scheduler, scheduler_names

    if sampler not in scheduler_names():
        pytest.skip(f"{sampler} needs a package this environment lacks")
    scheduler = build_scheduler(sampler, PROCESSES[name])
    scheduler.set_timesteps(12)
    process = build_process(PROCESSES[name])
    steps = scheduler.timesteps.double()
    assert (steps[1:] <= steps[:-1]).all() and steps[-1] < steps[0], (
        "the steps must go from noise toward data"
    )
    # the model-time of each step -> the nearest training index -> its log-SNR
    model_time = process.model_input(torch.zeros(1), torch.arange(process.num_timesteps))[1].double()
    index = (steps[:, None] - model_time[None, :]).abs().argmin(dim=1)
    log_snr = process.log_snr()[index]
    assert log_snr[0] < -3 and log_snr[-1] > 2
