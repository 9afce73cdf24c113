"""ψ and ξ over the process's noise level (docs/method.md §12): the log-SNR port of the power schedules, the
logit-normal offsets, which end is noise for every density on every process, and min-SNR / inverse-SNR on
every prediction target (docs/method.md §8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difftune.config.experiment import ConfigError, ObjectiveConfig
from difftune.config.objective import LogitNormalSchedule, PowerAxis, PowerSchedule
from difftune.errors import UserError
from difftune.objectives import build_objective
from difftune.process import build_process
from difftune.schedules import noise_level
from difftune.schedules.base import build_schedule, power_down, power_up, uniform
from test_process_contract import PROCESSES

T = 1000


DDPM = PROCESSES["ddpm-epsilon"]


def _noise(name: str):
    return build_process(PROCESSES[name]).noise_levels()


def _mean_logit_sigma(probs: torch.Tensor, log_snr: torch.Tensor) -> float:
    """Mean logit(σ_flow) = mean −λ/2 (finite indices only: λ = −∞ has no mass in these uses)."""
    finite = torch.isfinite(log_snr)
    assert float(probs[~finite].sum()) == 0.0
    return float((probs[finite] * -log_snr[finite] / 2).sum())


# ------------------------------------------------------------------------------- the log-SNR port


def test_the_reference_is_diffusers_ddpm_linear_schedule() -> None:
    assert torch.equal(noise_level.reference_log_snr(), build_process(DDPM).log_snr())


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("name", ["power_up", "power_down"])
def test_on_the_ddpm_linear_schedule_the_log_snr_port_is_the_index_port(name: str, exponent: float) -> None:
    noise = _noise("ddpm-v")  # the prediction type does not matter: same noise levels
    by_index = build_schedule(name, T, exponent)
    by_log_snr = build_schedule(name, T, exponent, noise, axis="log_snr")
    torch.testing.assert_close(by_log_snr.probs(), by_index.probs(), rtol=1e-14, atol=0)
    assert by_log_snr.name == f"{by_index.name}@log_snr"


def test_ddpm_t250_has_the_snr_of_flow_sigma_049_and_the_port_lands_there() -> None:
    lam_250 = noise_level.reference_log_snr()[250]
    assert float(noise_level.flow_sigma(lam_250)) == pytest.approx(0.4893, abs=1e-4)
    flow = build_process(PROCESSES["flow"])
    nearest = int((flow.log_snr() - lam_250).abs().argmin())
    assert float(flow.sigmas[nearest]) == pytest.approx(0.489, abs=1e-3)
    # the mass ψ puts on DDPM t <= 250 is the mass its port puts on flow σ <= 0.489 (up to one cell)
    ddpm_mass = float(power_up(T).probs()[:251].sum())
    ported = build_schedule("power_up", T, 1.0, flow.noise_levels(), axis="log_snr").probs()
    assert float(ported[: nearest + 1].sum()) == pytest.approx(ddpm_mass, abs=2e-3)


def test_the_papers_streams_sit_1_1_either_side_of_uniform_t_in_logit_sigma() -> None:
    lam = noise_level.reference_log_snr()
    centre = _mean_logit_sigma(uniform(T).probs(), lam)
    assert centre == pytest.approx(1.3504, abs=1e-4)  # uniform DDPM t already leans toward noise
    assert _mean_logit_sigma(power_up(T).probs(), lam) - centre == pytest.approx(1.1065, abs=1e-4)
    assert _mean_logit_sigma(power_down(T).probs(), lam) - centre == pytest.approx(-1.1065, abs=1e-4)


@pytest.mark.parametrize("process", ["flow", "flow-shift3", "edm"])
@pytest.mark.parametrize("name", ["power_up", "power_down"])
def test_the_port_is_the_jacobian_formula_and_keeps_the_distribution_of_log_snr(
    process: str, name: str
) -> None:
    """p(t') ∝ ψ(t_ddpm(λ(t'))) · |dt_ddpm/dλ| · |dλ/dt'|, evaluated pointwise by finite differences, is the
    port to within 1% in total variation; the mean logit σ is DDPM's where the model covers DDPM's range."""
    noise = _noise(process)
    ported = build_schedule(name, T, 1.0, noise, axis="log_snr").probs().numpy()
    lam_ref, lam = noise_level.reference_log_snr().numpy(), noise.log_snr.numpy()
    k = np.arange(T, dtype=np.float64)
    psi = k + 1 if name == "power_up" else T - k
    inside = np.isfinite(lam) & (lam < lam_ref[0]) & (lam > lam_ref[-1])
    t_ddpm = np.interp(-lam, -lam_ref, k)
    dt_dlam = np.interp(-lam, -lam_ref, 1 / np.abs(np.gradient(lam_ref)))
    dlam_dt = np.abs(np.gradient(np.where(np.isfinite(lam), lam, -60.0)))
    formula = np.where(inside, np.interp(t_ddpm, k, psi) * dt_dlam * dlam_dt, 0.0)
    formula /= formula.sum()
    assert 0.5 * np.abs(ported - formula).sum() < 0.01
    if process.startswith("flow"):  # flow's range holds DDPM's: nothing is dropped
        reference = (power_up if name == "power_up" else power_down)(T).probs()
        expected = _mean_logit_sigma(reference, noise_level.reference_log_snr())
        assert _mean_logit_sigma(torch.from_numpy(ported), noise.log_snr) == pytest.approx(expected, abs=0.01)


def test_beyond_the_ddpm_range_mass_is_dropped_not_piled_on_the_end() -> None:
    edm = _noise("edm")  # σ in [0.002, 80]: cleaner than DDPM's t = 0 at one end, less noisy than t = 999
    ref = power_up(T).probs()
    kept = noise_level.ported(ref, edm.log_snr)
    assert float(kept.sum()) == pytest.approx(0.865, abs=0.002)  # 13.5% of ψ is noisier than EDM's σ_max
    weights = build_schedule("power_up", T, 1.0, edm, axis="log_snr").weights()
    assert float(weights.max()) < 3  # not the 137 at σ_max that piling it there would give
    cleaner = edm.log_snr > noise_level.reference_log_snr()[0] + 1.0  # past DDPM t = 0's cell
    assert cleaner.sum() > 100 and float(weights[cleaner].abs().max()) == 0.0


# ----------------------------------------------------------------------------- logit-normal offsets


def test_pretraining_densities() -> None:
    assert torch.equal(_noise("ddpm-epsilon").pretraining, torch.full((T,), 1 / T, dtype=torch.float64))
    assert torch.equal(_noise("flow-shift3").pretraining, torch.full((T,), 1 / T, dtype=torch.float64))
    edm = build_process(PROCESSES["edm"])
    assert torch.equal(edm.noise_levels().pretraining, edm.pretraining_density())


@pytest.mark.parametrize("offset", [0.5, 1.1])
def test_logit_normal_moves_edms_lognormal_by_the_offset_in_log_sigma(offset: float) -> None:
    """For EDM logit(σ_flow) = ln σ, and its log-normal sits well inside its range: the mean moves by ±offset."""
    edm = build_process(PROCESSES["edm"])
    noise, log_sigma = edm.noise_levels(), edm.sigmas.log()
    before = float((noise.pretraining * log_sigma).sum())
    up = build_schedule("logit_normal_up", T, noise=noise, offset=offset).probs()
    down = build_schedule("logit_normal_down", T, noise=noise, offset=offset).probs()
    assert float((up * log_sigma).sum()) - before == pytest.approx(offset, abs=0.01)
    assert float((down * log_sigma).sum()) - before == pytest.approx(-offset, abs=0.01)
    spread = lambda p: float((p * log_sigma**2).sum() - (p * log_sigma).sum() ** 2) ** 0.5  # noqa: E731
    assert spread(up) == pytest.approx(spread(noise.pretraining), rel=0.02)  # moved, not reshaped


def test_a_zero_offset_is_the_pretraining_density_exactly() -> None:
    for name in ("ddpm-epsilon", "flow-shift3", "edm"):
        noise = _noise(name)
        for kind in ("logit_normal_up", "logit_normal_down"):
            probs = build_schedule(kind, T, noise=noise, offset=0.0).probs()
            torch.testing.assert_close(probs, noise.pretraining / noise.pretraining.sum(), rtol=1e-14, atol=0)


# ---------------------------------------------------------------------- which end is noise, everywhere


def _mean_sigma(probs: torch.Tensor, noise) -> float:
    """Mean σ_flow = sigmoid(−λ/2): the noise level that compares across processes (1 at pure noise)."""
    return float((probs * noise_level.flow_sigma(noise.log_snr)).sum())


STREAMS = {  # (target stream, bank stream, what they lean away from), per port
    "index": (("power_up", "index"), ("power_down", "index"), ("uniform", "index")),
    "log_snr": (("power_up", "log_snr"), ("power_down", "log_snr"), ("power_up@0", "log_snr")),
    "logit_normal": (("logit_normal_up", "index"), ("logit_normal_down", "index"), ("pretraining", "index")),
}


def _probs(kind: str, axis: str, noise) -> torch.Tensor:
    if kind == "pretraining":
        return noise.pretraining
    name, _, exponent = kind.partition("@")
    return build_schedule(name, T, float(exponent or 1.0), noise, axis=axis).probs()


@pytest.mark.parametrize("port", sorted(STREAMS))
@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_the_target_stream_is_noisier_and_the_bank_stream_cleaner_on_every_process(
    process: str, port: str
) -> None:
    """ψ's mean noise level is above its port's neutral density and ξ's below (the commonest flow-matching
    bug is an inverted convention). The neutral density of the log-SNR port is DDPM's uniform t carried over."""
    noise = _noise(process)
    target, bank, neutral = (_mean_sigma(_probs(kind, axis, noise), noise) for kind, axis in STREAMS[port])
    assert bank + 0.05 < neutral < target - 0.05
    plain = _mean_sigma(uniform(T).probs(), noise)
    if port != "log_snr":  # the log-SNR port carries DDPM's noise-heavy spread: see the next test
        assert bank < plain < target


def test_the_log_snr_port_keeps_ddpms_noise_levels_whatever_the_models_uniform() -> None:
    """On flow and EDM the ported ξ is noisier than uniform t of the model (docs/method.md §12)."""
    measured = {}
    for process in ("flow", "edm"):
        noise = _noise(process)
        measured[process] = [
            round(_mean_sigma(p, noise), 3)
            for p in (
                uniform(T).probs(),
                _probs("power_down", "log_snr", noise),
                _probs("power_up", "log_snr", noise),
            )
        ]
    assert measured == {"flow": [0.501, 0.539, 0.847], "edm": [0.415, 0.536, 0.825]}


# ------------------------------------------------------------------------------------ config to objective


class _Backbone:
    learns_variance = False


@pytest.mark.parametrize("process", ["flow-shift3", "edm"])
def test_the_config_picks_the_axis_and_each_streams_offset(process: str) -> None:
    noise = _noise(process)
    ported = ObjectiveConfig(power=PowerAxis(axis="log_snr"), power_up=PowerSchedule(exponent=1.5))
    objective = build_objective(ported, build_process(PROCESSES[process]), _Backbone())
    for schedule, name, exponent in zip(
        objective.schedules, ("power_up", "power_down"), (1.5, 1.0), strict=True
    ):
        expected = build_schedule(name, T, exponent, noise, axis="log_snr")
        assert torch.equal(schedule.probs(), expected.probs())
        assert not torch.equal(schedule.probs(), build_schedule(name, T, exponent).probs())
    shifted = ObjectiveConfig(
        target_schedule="logit_normal_up",
        bank_schedule="logit_normal_down",
        logit_normal_up=LogitNormalSchedule(offset=0.7),
        logit_normal_down=LogitNormalSchedule(offset=1.6),
    )
    objective = build_objective(shifted, build_process(PROCESSES[process]), _Backbone())
    for schedule, name, offset in zip(
        objective.schedules, ("logit_normal_up", "logit_normal_down"), (0.7, 1.6), strict=True
    ):
        assert torch.equal(schedule.probs(), build_schedule(name, T, noise=noise, offset=offset).probs())
    assert objective.schedules[1].name == "logit_normal_down(offset=1.6)"


def test_the_default_config_builds_the_index_schedules_exactly() -> None:
    objective = build_objective(ObjectiveConfig(), build_process(DDPM), _Backbone())
    assert torch.equal(objective.schedules[0].probs(), power_up(T).probs())
    assert torch.equal(objective.schedules[1].probs(), power_down(T).probs())


def test_axes_and_offsets_are_checked() -> None:
    with pytest.raises(
        ConfigError,
        match=r"objective.power.axis='sigma': use one of \['auto', 'index', 'log_snr', 'offsets'\]",
    ):
        ObjectiveConfig(power=PowerAxis(axis="sigma"))
    with pytest.raises(ConfigError, match="objective.logit_normal_down.offset=-1.0 must be >= 0"):
        ObjectiveConfig(logit_normal_down=LogitNormalSchedule(offset=-1.0))
    assert ObjectiveConfig(bank_schedule="logit_normal_down").bank_schedule == "logit_normal_down"
    with pytest.raises(UserError, match="schedule 'power_up' needs the model's 1000 noise levels"):
        build_schedule("power_up", T, axis="log_snr")
    with pytest.raises(UserError, match="schedule 'logit_normal_up' needs the model's 1000 noise levels"):
        build_schedule("logit_normal_up", T)
    with pytest.raises(UserError, match="offset=-0.5 must be >= 0"):
        build_schedule("logit_normal_down", T, noise=_noise("edm"), offset=-0.5)
    with pytest.raises(UserError, match="schedule axis 'time' is unknown"):
        build_schedule("power_up", T, axis="time")
    # uniform stays uniform over the index on both axes, and needs no noise levels
    assert torch.equal(build_schedule("uniform", T, axis="log_snr").probs(), uniform(T).probs())
