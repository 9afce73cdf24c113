"""Tests for difftune.analysis.gaussian: closed-form optimal denoisers and the chain-of-forgetting gap.

The gap tests assert only what holds: the paper's limits for every pair, exact identities, the
theorem cases, and the counterexamples that show where "the gap grows with t" fails (module docstring).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from difftune.analysis.gaussian import (
    GAP_SPACES,
    GaussianMixture,
    ddpm_alphas_cumprod,
    is_monotone_increasing,
    noised_kl,
    optimal_eps,
    optimal_score,
    optimal_x0,
    random_gmm,
    single_gaussian_x0_gap,
    transfer_gap,
    transfer_gaps,
)

T_GRID = [0, 10, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999]
DIMS = [2, 4, 8]


@pytest.fixture(scope="module")
def abar() -> torch.Tensor:
    return ddpm_alphas_cumprod()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _independent_pair(d: int) -> tuple[GaussianMixture, GaussianMixture]:
    g = _gen(1000 + d)
    return random_gmm(2, d, g), random_gmm(3, d, g)


@pytest.fixture(scope="module")
def independent_gaps(abar: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """All gaps over T_GRID for one independent random pair per d (K=2 source, K=3 target)."""
    return {d: transfer_gaps(*_independent_pair(d), T_GRID, 4000, _gen(0), abar) for d in DIMS}


# -------------------------------------------------------------------------------------- the mixture


def test_schedule_is_diffusers_default(abar: torch.Tensor) -> None:
    assert abar.shape == (1000,) and abar.dtype == torch.float64
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)  # the float32 table diffusers builds
    torch.testing.assert_close(abar, torch.cumprod(1 - betas, 0).double(), rtol=1e-6, atol=0)


def test_sample_moments_and_reproducibility() -> None:
    gmm = random_gmm(3, 3, _gen(0), spread=1.0)
    x = gmm.sample(200_000, _gen(1))
    assert x.shape == (200_000, 3) and x.dtype == torch.float64
    second = (gmm.weights[:, None, None] * (gmm.covs + gmm.means[:, :, None] * gmm.means[:, None, :])).sum(0)
    cov = second - torch.outer(gmm.mean, gmm.mean)
    # Standard errors are ~0.003 (mean) and ~0.005 (covariance) here; the tolerances are ~8 of them.
    torch.testing.assert_close(x.mean(0), gmm.mean, rtol=0, atol=0.025)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=0.04)
    assert torch.equal(gmm.sample(10, _gen(7)), gmm.sample(10, _gen(7)))


@pytest.mark.parametrize(
    ("weights", "means", "covs", "match"),
    [
        ([[1.0]], [[0.0]], [[[1.0]]], "weights must have shape"),
        ([0.5, 0.5], [[0.0]], [[[1.0]]], "means must have shape"),
        ([1.0], [[0.0, 0.0]], [[[1.0]]], "covs must have shape"),
        ([0.7, 0.7], [[0.0], [1.0]], [[[1.0]], [[1.0]]], "sum to 1"),
        ([1.5, -0.5], [[0.0], [1.0]], [[[1.0]], [[1.0]]], "positive"),
        ([1.0], [[float("nan"), 0.0]], [[[1.0, 0.0], [0.0, 1.0]]], "finite"),
        ([1.0], [[0.0, 0.0]], [[[1.0, 0.5], [0.0, 1.0]]], "symmetric"),
        ([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]], "positive definite"),
    ],
)
def test_validation(weights: list, means: list, covs: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GaussianMixture(torch.tensor(weights), torch.tensor(means), torch.tensor(covs))


def test_bad_arguments() -> None:
    gmm = random_gmm(2, 3, _gen(0))
    with pytest.raises(ValueError, match="abar"):
        optimal_x0(gmm, torch.zeros(4, 3), 1.0)
    with pytest.raises(ValueError, match="x_t must have shape"):
        optimal_eps(gmm, torch.zeros(4, 2), 0.5)
    with pytest.raises(ValueError, match="dimension"):
        transfer_gap(gmm, random_gmm(2, 4, _gen(1)), [0], 10)
    with pytest.raises(ValueError, match="valid: x0, x0_bias, eps, score, relative"):
        transfer_gap(gmm, gmm, [0], 10, space="v")
    with pytest.raises(ValueError, match="timesteps"):
        transfer_gap(gmm, gmm, [1000], 10)


# ---------------------------------------------------------------------------- the optimal denoisers


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_single_gaussian_x0_is_the_textbook_posterior_mean(abar: torch.Tensor, t: int) -> None:
    g = _gen(3)
    gmm = random_gmm(1, 3, g)
    a = abar[t]
    x_t = torch.randn(16, 3, generator=g, dtype=torch.float64) * 2
    # Information form: precision = Sigma^-1 + (a / (1 - a)) I, mean = cov (Sigma^-1 mu + sqrt(a) x_t / (1 - a)).
    prec0 = torch.linalg.inv(gmm.covs[0])
    post_cov = torch.linalg.inv(prec0 + a / (1 - a) * torch.eye(3, dtype=torch.float64))
    expected = (post_cov @ (prec0 @ gmm.means[0] + a.sqrt() / (1 - a) * x_t).T).T
    torch.testing.assert_close(optimal_x0(gmm, x_t, a), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t", [0, 50, 300, 900])
def test_mixture_x0_matches_grid_quadrature_in_1d(abar: torch.Tensor, t: int) -> None:
    gmm = GaussianMixture(
        torch.tensor([0.3, 0.7]), torch.tensor([[-1.5], [2.0]]), torch.tensor([[[0.5]], [[1.3]]])
    )
    a = float(abar[t])
    x_t = np.linspace(-3.0, 3.0, 7)
    # p(x0 | x_t) on a dense grid: 1e-4 spacing is >= 100 points per posterior std even at t = 0,
    # where the trapezoid rule is spectrally accurate for these smooth, fast-decaying integrands.
    x0 = np.linspace(-20.0, 20.0, 400_001)
    log_prior = np.logaddexp(
        np.log(0.3) - 0.5 * (x0 + 1.5) ** 2 / 0.5 - 0.5 * np.log(2 * np.pi * 0.5),
        np.log(0.7) - 0.5 * (x0 - 2.0) ** 2 / 1.3 - 0.5 * np.log(2 * np.pi * 1.3),
    )
    log_post = log_prior[None, :] - 0.5 * (x_t[:, None] - math.sqrt(a) * x0[None, :]) ** 2 / (1 - a)
    w = np.exp(log_post - log_post.max(1, keepdims=True))
    expected = np.trapezoid(w * x0, x0, axis=1) / np.trapezoid(w, x0, axis=1)
    got = optimal_x0(gmm, torch.from_numpy(x_t)[:, None], a)[:, 0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("d", DIMS)
def test_eps_x0_and_score_are_consistent(abar: torch.Tensor, d: int) -> None:
    g = _gen(d)
    gmm = random_gmm(3, d, g)
    x_t = 3 * torch.randn(64, d, generator=g, dtype=torch.float64)
    for t in T_GRID:
        a = abar[t]
        x0, eps = optimal_x0(gmm, x_t, a), optimal_eps(gmm, x_t, a)
        # Computed by separate formulas (eps without the subtraction), so this is a real check.
        torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * eps, x_t, rtol=0, atol=1e-10)
        torch.testing.assert_close(optimal_score(gmm, x_t, a), -eps / (1 - a).sqrt(), rtol=1e-12, atol=1e-12)


def test_score_is_the_gradient_of_the_noised_log_density(abar: torch.Tensor) -> None:
    gmm = random_gmm(3, 4, _gen(5))
    a = abar[300]
    x_t = torch.randn(8, 4, generator=_gen(6), dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(gmm.noised(a).log_prob(x_t).sum(), x_t)
    torch.testing.assert_close(optimal_score(gmm, x_t.detach(), a), grad, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------ the gap


def test_gap_is_zero_for_identical_distributions(abar: torch.Tensor) -> None:
    gmm = random_gmm(3, 4, _gen(11))
    copy = GaussianMixture(gmm.weights.clone(), gmm.means.clone(), gmm.covs.clone())
    gaps = transfer_gaps(copy, gmm, T_GRID, 500, _gen(0), abar)
    assert set(gaps) == set(GAP_SPACES)
    for space, gap in gaps.items():
        assert gap.shape == (len(T_GRID),)
        assert float(gap.abs().max()) < 1e-20, space


@pytest.mark.parametrize("d", DIMS)
def test_x0_gap_has_the_papers_limits(abar: torch.Tensor, d: int) -> None:
    """t -> 0: identity for any distribution (gap -> 0); t -> T: the data mean (gap -> ||Δmean||^2 / d)."""
    source, target = _independent_pair(d)
    mean_gap = float((source.mean - target.mean).pow(2).sum()) / d
    limits = transfer_gap(
        source, target, [0, 1], 2000, _gen(0), torch.tensor([1 - 1e-9, 1e-12], dtype=torch.float64)
    )
    assert float(limits[0]) < 1e-12 * mean_gap
    assert float(limits[1]) == pytest.approx(mean_gap, rel=1e-4)
    # The DDPM table's own ends are close to the limits already.
    ends = transfer_gap(source, target, [0, 999], 2000, _gen(0), abar)
    assert float(ends[0]) < 1e-4 * mean_gap
    assert float(ends[1]) == pytest.approx(mean_gap, rel=0.05)


@pytest.mark.parametrize("d", DIMS)
def test_x0_gap_is_twice_the_snr_derivative_of_kl(abar: torch.Tensor, d: int) -> None:
    """Mismatched estimation (Verdú 2010): d * G_eps / 2 = dKL(p_t^target || p_t^source) / d log snr."""
    source, target = _independent_pair(d)
    for t in (50, 200, 500):
        a = float(abar[t])
        log_snr, h = math.log(a / (1 - a)), 0.02
        gaps = transfer_gaps(source, target, [t], 20_000, _gen(1), abar)
        kl = [noised_kl(target, source, 1 / (1 + math.exp(-(log_snr + s))), 20_000, _gen(5)) for s in (h, -h)]
        assert d * float(gaps["eps"][0]) / 2 == pytest.approx((kl[0] - kl[1]) / (2 * h), rel=0.03)
        # ... and the x0 gap is the same derivative taken per unit of snr.
        assert float(gaps["x0"][0]) == pytest.approx(float(gaps["eps"][0]) * (1 - a) / a, rel=1e-9)


@pytest.mark.parametrize("d", DIMS)
def test_single_gaussian_closed_form_matches_monte_carlo(abar: torch.Tensor, d: int) -> None:
    g = _gen(20 + d)
    source, target = random_gmm(1, d, g), random_gmm(1, d, g)
    ts = [50, 200, 400, 800]
    mc = transfer_gaps(source, target, ts, 20_000, _gen(2), abar)
    for i, t in enumerate(ts):
        loc, shape = single_gaussian_x0_gap(source, target, abar[t])
        assert float(mc["x0"][i]) == pytest.approx(loc + shape, rel=0.03)
        assert float(mc["x0_bias"][i]) == pytest.approx(loc, rel=0.03)


@pytest.mark.parametrize("d", DIMS)
def test_location_term_is_monotone_for_any_single_gaussian_pair(abar: torch.Tensor, d: int) -> None:
    """Theorem: ||(I + snr Sigma_s)^-1 (m_t - m_s)||^2 grows as snr falls, whatever the covariances."""
    for seed in range(5):
        g = _gen(100 * d + seed)
        source, target = random_gmm(1, d, g), random_gmm(1, d, g)
        loc = [single_gaussian_x0_gap(source, target, abar[t])[0] for t in range(0, 1000, 7)]
        assert is_monotone_increasing(loc)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_x0_gap_grows_with_t_when_domains_differ_in_location(abar: torch.Tensor, d: int, k: int) -> None:
    """The claim, in the regime of its premise: shared local structure, different global location.

    The target is a random mixture (means spread 2 per coordinate) and the source its translate by
    a random shift of 8 per coordinate. For k = 1 monotonicity is a theorem (the shape term is zero);
    for mixtures it is a measurement: 120 of 120 random pairs at this shift, but only 110 of 120 at
    a shift of 2, and 39 of 120 for independent mixtures (module docstring).
    """
    g = _gen(10 * d + k)
    target = random_gmm(k, d, g)
    shift = torch.randn(d, generator=g, dtype=torch.float64)
    source = GaussianMixture(
        target.weights, target.means + 8 * math.sqrt(d) * shift / shift.norm(), target.covs
    )
    gap = transfer_gap(source, target, T_GRID, 4000, _gen(0), abar)
    assert is_monotone_increasing(gap)
    assert spearmanr(T_GRID, gap).statistic > 0.95
    assert float(gap[-1]) > 1e4 * float(gap[0])


@pytest.mark.parametrize("d", DIMS)
def test_eps_gap_is_a_hump_not_a_monotone_curve(independent_gaps: dict, d: int) -> None:
    """G_eps = (2/d) dKL/d log snr integrates to a finite KL, so it must vanish at both ends."""
    eps = independent_gaps[d]["eps"]
    assert not is_monotone_increasing(eps)
    assert float(eps.max()) > 100 * float(eps[0])
    assert float(eps.max()) > 100 * float(eps[-1])
    # The peak sits where eps* is neither ~0 (t -> 0) nor ~x_t (t -> T).
    assert 50 <= T_GRID[int(eps.argmax())] <= 300


def test_x0_gap_is_a_hump_for_equal_means() -> None:
    """Counterexample to monotonicity: same mean, covariances I vs 0.1 I; only the shape term remains."""
    eye = torch.eye(2, dtype=torch.float64)
    target = GaussianMixture(torch.ones(1), torch.zeros(1, 2), eye[None])
    source = GaussianMixture(torch.ones(1), torch.zeros(1, 2), 0.1 * eye[None])
    abar = ddpm_alphas_cumprod()
    terms = [single_gaussian_x0_gap(source, target, abar[t]) for t in T_GRID]
    assert all(loc == 0.0 for loc, _ in terms)
    shape = torch.tensor([s for _, s in terms])
    assert not is_monotone_increasing(shape)
    assert float(shape[-1]) < 1e-3 * float(shape.max()) and float(shape[0]) < 1e-3 * float(shape.max())
    mc = transfer_gap(source, target, T_GRID, 4000, _gen(0), abar)
    assert not is_monotone_increasing(mc)
    assert T_GRID[int(mc.argmax())] == T_GRID[int(shape.argmax())] == 200


def test_is_monotone_increasing() -> None:
    assert is_monotone_increasing([0.0, 1.0, 1.0, 2.0])
    assert not is_monotone_increasing([0.0, 2.0, 1.95])
    assert is_monotone_increasing([0.0, 2.0, 1.95], tolerance=0.05)  # a drop of 0.05 <= 0.05 * max = 0.1
    assert not is_monotone_increasing([0.0, 2.0, 1.8], tolerance=0.05)
    assert is_monotone_increasing(torch.tensor([3.0]))
