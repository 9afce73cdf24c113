"""Tests for difftune.schedules.base: exact probability tables, importance sampling vs weighting, registry."""

from __future__ import annotations

import math

import pytest
import torch

from difftune.schedules.base import (
    SCHEDULES,
    TimestepSchedule,
    build_schedule,
    power_down,
    power_up,
    uniform,
)

T = 1000
EXPONENTS = [0.0, 0.5, 1.0, 1.5]
t64 = torch.arange(T, dtype=torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-12) -> bool:
    return a.dtype == torch.float64 and torch.allclose(a, b.to(torch.float64), rtol=rtol, atol=0.0)


# --------------------------------------------------------------------------------------------- tables


@pytest.mark.parametrize("s", EXPONENTS)
def test_power_up_probs_equal_formula(s: float) -> None:
    expected = (t64 + 1) ** s / ((t64 + 1) ** s).sum()
    probs = power_up(T, s).probs()
    assert probs.shape == (T,)
    assert _close(probs, expected)


@pytest.mark.parametrize("s", EXPONENTS)
def test_power_down_probs_equal_formula(s: float) -> None:
    expected = (T - t64) ** s / ((T - t64) ** s).sum()
    probs = power_down(T, s).probs()
    assert probs.shape == (T,)
    assert _close(probs, expected)


def test_uniform_probs_and_weights() -> None:
    sched = uniform(T)
    assert _close(sched.probs(), torch.full((T,), 1.0 / T, dtype=torch.float64))
    assert torch.allclose(sched.weights(), torch.ones(T, dtype=torch.float64), rtol=1e-12, atol=0)
    # the exponent is accepted and ignored
    assert torch.equal(uniform(T, 3.0).probs(), sched.probs())


@pytest.mark.parametrize("factory", [power_up, power_down, uniform])
@pytest.mark.parametrize("s", EXPONENTS)
def test_weights_are_T_times_probs_with_mean_one(factory, s: float) -> None:
    sched = factory(T, s)
    p, w = sched.probs(), sched.weights()
    assert w.dtype == torch.float64
    assert torch.allclose(w, T * p, rtol=1e-12, atol=0)
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)
    assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-12)
    assert (p > 0).all()


@pytest.mark.parametrize("factory", [power_up, power_down])
def test_exponent_zero_is_uniform(factory) -> None:
    assert torch.allclose(factory(T, 0.0).probs(), uniform(T).probs(), rtol=1e-12, atol=0)


def test_linear_weights_match_paper_psi_and_xi() -> None:
    # s = 1: psi(t) = 2 (t + 1) / (T + 1), xi(t) = 2 (T - t) / (T + 1)  (docs/method.md §2)
    assert torch.allclose(power_up(T, 1.0).weights(), 2 * (t64 + 1) / (T + 1), rtol=1e-12, atol=0)
    assert torch.allclose(power_down(T, 1.0).weights(), 2 * (T - t64) / (T + 1), rtol=1e-12, atol=0)


def test_power_schedules_put_mass_on_the_right_end() -> None:
    up, down = power_up(T, 1.0).probs(), power_down(T, 1.0).probs()
    assert (up[1:] > up[:-1]).all()  # increasing in t: high noise
    assert (down[1:] < down[:-1]).all()  # decreasing in t: low noise
    assert torch.allclose(up, down.flip(0), rtol=1e-12, atol=0)


def test_probs_returns_a_copy() -> None:
    sched = power_up(T, 1.0)
    p = sched.probs()
    p.zero_()
    assert math.isclose(float(sched.probs().sum()), 1.0, rel_tol=1e-12)


# ------------------------------------------------------------------------- sampling vs weighting


def _L(t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear per-timestep 'loss'."""
    u = t.to(torch.float64) / T
    return torch.sin(6.0 * u) ** 2 + 3.0 * u**3 + 0.1


@pytest.mark.parametrize(
    "sched", [power_up(T, 1.0), power_up(T, 1.5), power_down(T, 1.0), power_down(T, 0.5)], ids=repr
)
def test_importance_sampling_equals_weighting_in_expectation(sched: TimestepSchedule) -> None:
    n = 200_000
    exact = float((sched.probs() * _L(t64)).sum())  # E_{t~p}[L]

    t_p = sched.sample(n, torch.Generator().manual_seed(1))
    a = _L(t_p)
    t_u = torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(2))
    b = sched.loss_weight(t_u).to(torch.float64) * _L(t_u)

    se_a, se_b = float(a.std()) / math.sqrt(n), float(b.std()) / math.sqrt(n)
    se_diff = math.sqrt(se_a**2 + se_b**2)
    assert abs(float(a.mean()) - float(b.mean())) < 4 * se_diff
    assert abs(float(a.mean()) - exact) < 4 * se_a
    assert abs(float(b.mean()) - exact) < 4 * se_b
    # the check has power: unweighted uniform t gives a clearly different expectation
    uniform_mean = float(_L(t64).mean())
    assert abs(uniform_mean - exact) > 20 * se_diff


@pytest.mark.parametrize("sched", [power_up(T, 1.0), power_down(T, 1.5), uniform(T)], ids=repr)
def test_sample_histogram_matches_probs(sched: TimestepSchedule) -> None:
    n = 200_000
    t = sched.sample(n, torch.Generator().manual_seed(3))
    assert t.dtype == torch.long and t.shape == (n,)
    assert int(t.min()) >= 0 and int(t.max()) <= T - 1
    counts = torch.bincount(t // 100, minlength=10).to(torch.float64)
    assert counts.shape == (10,)
    expected = sched.probs().view(10, 100).sum(1)
    se = torch.sqrt(expected * (1 - expected) / n)
    assert (torch.abs(counts / n - expected) < 4 * se).all(), (counts / n, expected)


def test_sample_is_reproducible_with_the_same_generator() -> None:
    sched = power_up(T, 1.0)
    a = sched.sample(1000, torch.Generator().manual_seed(7))
    b = sched.sample(1000, torch.Generator().manual_seed(7))
    c = sched.sample(1000, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_zero() -> None:
    t = power_up(T).sample(0, torch.Generator().manual_seed(0))
    assert t.shape == (0,) and t.dtype == torch.long


def test_loss_weight_indexes_the_table() -> None:
    sched = power_down(T, 1.5)
    t = torch.tensor([[0, 999], [500, 3]])
    w = sched.loss_weight(t)
    assert w.shape == (2, 2) and w.dtype == torch.float32 and w.device == t.device
    expected = (sched.weights()[t.flatten()]).view(2, 2).float()
    assert torch.equal(w, expected)
    # the values themselves: T (T - t)^s / sum (T - t)^s
    norm = float(((T - t64) ** 1.5).sum())
    for ti, wi in zip(t.flatten().tolist(), w.flatten().tolist(), strict=True):
        assert math.isclose(wi, T * (T - ti) ** 1.5 / norm, rel_tol=1e-6)


# ------------------------------------------------------------------------ custom schedules, errors


def test_custom_callable_schedule() -> None:
    sched = TimestepSchedule(lambda u: u**2, T)
    assert torch.allclose(sched.probs(), power_up(T, 2.0).probs(), rtol=1e-12, atol=0)
    rev = TimestepSchedule(lambda u: u**2, T, reverse_time=True)
    assert torch.allclose(rev.probs(), power_down(T, 2.0).probs(), rtol=1e-12, atol=0)
    # a non-power density, evaluated at u = (t + 1) / T
    ex = TimestepSchedule(torch.exp, T, name="exp")
    u = (t64 + 1) / T
    assert torch.allclose(ex.probs(), torch.exp(u) / torch.exp(u).sum(), rtol=1e-12, atol=0)
    assert "exp" in repr(ex)


def test_build_schedule_by_name() -> None:
    assert torch.allclose(
        build_schedule("power_up", T, 1.5).probs(), power_up(T, 1.5).probs(), rtol=0, atol=0
    )
    assert torch.allclose(
        build_schedule("power_down", T, 0.5).probs(), power_down(T, 0.5).probs(), rtol=0, atol=0
    )
    assert torch.equal(build_schedule("uniform", T, 1.0).probs(), uniform(T).probs())
    assert build_schedule("power_up", 10).num_timesteps == 10


def test_build_schedule_from_module_function(tmp_path, monkeypatch) -> None:
    (tmp_path / "difftune_test_densities.py").write_text("def cubic_plus(u):\n    return u**3 + 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sched = build_schedule("difftune_test_densities:cubic_plus", T)
    u = (t64 + 1) / T
    expected = (u**3 + 0.5) / (u**3 + 0.5).sum()
    assert torch.allclose(sched.probs(), expected, rtol=1e-12, atol=0)
    # a library function works too
    assert torch.allclose(
        build_schedule("torch:exp", T).probs(), torch.exp(u) / torch.exp(u).sum(), rtol=1e-12
    )


@pytest.mark.parametrize("spec", ["difftune_no_such_module_xyz:f", "math:no_such_function_xyz"])
def test_build_schedule_bad_import_raises(spec: str) -> None:
    with pytest.raises(ValueError, match="cannot import"):
        build_schedule(spec, T)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        build_schedule("power_sideways", T)
    message = str(info.value)
    assert "power_sideways" in message
    for name in SCHEDULES:
        assert name in message
    assert set(SCHEDULES) == {"uniform", "power_up", "power_down"}


@pytest.mark.parametrize(
    "density",
    [
        lambda u: u - 0.5,  # negative values
        lambda u: u * float("nan"),  # NaN
        lambda u: u * float("inf"),  # inf
        lambda u: torch.zeros_like(u),  # all zero
    ],
    ids=["negative", "nan", "inf", "zero"],
)
def test_invalid_density_raises(density) -> None:
    with pytest.raises(ValueError, match="finite, non-negative"):
        TimestepSchedule(density, T)


def test_density_with_wrong_shape_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        TimestepSchedule(lambda u: u[:-1], T)


def test_zero_timesteps_raises() -> None:
    with pytest.raises(ValueError, match="num_timesteps"):
        power_up(0)
