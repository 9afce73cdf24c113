"""Analytic check of the chain of forgetting on Gaussian mixtures (docs/method.md §1).

For Gaussian-mixture data the MMSE-optimal DDPM denoiser has a closed form, so the gap between the
source-optimal and the target-optimal denoiser can be measured exactly (up to Monte-Carlo over x_t)
at every t. With x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, each component N(mu_k, Sigma_k) of weight
pi_k becomes N(sqrt(abar) mu_k, C_k) with C_k = abar Sigma_k + (1 - abar) I, and

    E[x0 | x_t]  = sum_k w_k(x_t) (mu_k + sqrt(abar) Sigma_k C_k^-1 (x_t - sqrt(abar) mu_k))
    E[eps | x_t] = sum_k w_k(x_t) sqrt(1 - abar) C_k^-1 (x_t - sqrt(abar) mu_k)
                 = (x_t - sqrt(abar) E[x0 | x_t]) / sqrt(1 - abar)
    w_k(x_t)     ∝ pi_k N(x_t; sqrt(abar) mu_k, C_k)          (softmax of log-densities)

The eps form is evaluated directly (not by subtraction) so that it stays exact as abar -> 1.

Which gap the paper's argument is about
---------------------------------------
The argument (docs/method.md §1) is about the denoiser D_t(x_t) = E[x0 | x_t]: as t -> 0 it tends to
the identity x_t / sqrt(abar) for any smooth distribution (domain-agnostic), as t -> T it tends to
the data mean E[x0] (a global statistic of the domain). So the quantity is the x0-space gap

    G_x0(t) = E_{x0 ~ target} ||D_source(x_t) - D_target(x_t)||^2 / d,

which is also the excess x0-MSE of the source denoiser on target data, and, by the mismatched-
estimation identity (Verdú, IEEE T-IT 2010), G_x0 = (2/d) dKL(p_t^target || p_t^source) / d snr with
snr = abar / (1 - abar). Its limits hold for every pair of mixtures (tested): G_x0 -> 0 as
(1/snr)^2 at t -> 0 and G_x0 -> ||mean_source - mean_target||^2 / d at t -> T. Note that the global
statistic that survives at t -> T is the first moment only.

What we measured (t in {0, 10, 50, 100, 200, ..., 900, 999}, diffusers' default linear betas)
------------------------------------------------------------------------------------------------
* eps space, G_eps = E||Δeps*||^2 / d (= the excess epsilon-loss of the source-optimal model on
  target data, i.e. what a loss-gap probe of real models measures): NOT monotone, for any pair with
  finite KL. G_eps = snr * G_x0 = (2/d) dKL/d(log snr), which integrates to 2 KL(p_0^t || p_0^s) / d
  over the whole log-snr line, so it must vanish at both ends: it is a hump peaking near t = 100-200.
  At t -> 0, eps* = -sqrt(1 - abar) * score shrinks (it does not amplify) the difference; at t -> T
  both predictors return ~x_t. Monotone in 0 of 480 independent and 0 of 720 translated pairs.
* score space, E||Δ score||^2 / d = G_eps / (1 - abar): monotone DEcreasing in 480 of 480
  independent random pairs and 710 of 720 translated ones (below): the noised distributions become
  alike, as the data-processing inequality says of their KL. Observed, not proven here.
* x0 space, G_x0: rises from 0 to ||Δmean||^2 / d, but is monotone only when the domains differ
  mainly in location. For one Gaussian per domain it splits exactly (:func:`single_gaussian_x0_gap`)
  into a location term ||(I - c_s)(m_t - m_s)||^2 / d, c_s = Sigma_s (Sigma_s + I/snr)^-1, which
  is monotone increasing (a theorem), plus a shape term that vanishes at both ends; equal means
  and different covariances give a pure hump (tested). For independent random mixtures the gap
  usually peaks at t ~ 300-600, where the noise is at the scale of the cluster layout, and then
  falls to ||Δmean||^2 / d: monotone in 55, 47, 39, 27 of 120 pairs for mean spreads 0.5, 1, 2, 4.
  For a mixture and its translate by a shift of per-coordinate size s (cluster spread 2): monotone
  in 98, 100, 110, 118, 120, 120 of 120 pairs for s = 0.5, 1, 2, 4, 8, 16.
* the bias part ||E[ΔD]||^2 / d of G_x0 (its "global statistics" part; equal to the location
  term above for one Gaussian): monotone in 101, 100, 94, 84 of 120 independent random pairs and
  115-120 of 120 translated ones: closer to the claim than G_x0, still not always.
* relative gap G_eps / MMSE_eps (identical in eps and x0 space): a hump; monotone in 11-25 of 120.

(Pairs: independent = two ``random_gmm`` with K in 1..3 vs 1..4, d in {2, 4, 8}, 40 seeds, for
each mean spread; translated = one ``random_gmm`` (K in 1..4, spread 2) and its translate; n = 4000
samples per curve, tolerance 0.)

So the claim "the gap grows with t" holds here for the x0-space gap when the domains differ by more
in global location than in local structure (the premise of the argument), and is false in general.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

GAP_SPACES = ("x0", "x0_bias", "eps", "score", "relative")


@dataclass
class GaussianMixture:
    """A mixture of K full-covariance Gaussians in d dimensions, stored in float64.

    Args:
        weights: mixing weights (K,), positive, summing to 1.
        means: component means (K, d).
        covs: component covariances (K, d, d), symmetric positive definite.
    """

    weights: torch.Tensor
    means: torch.Tensor
    covs: torch.Tensor

    def __post_init__(self) -> None:
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.covs = torch.as_tensor(self.covs, dtype=torch.float64)
        w, m, c = self.weights, self.means, self.covs
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError(f"weights must have shape (K,) with K >= 1, got {tuple(w.shape)}")
        if m.ndim != 2 or m.shape[0] != w.shape[0] or m.shape[1] == 0:
            raise ValueError(f"means must have shape (K={w.shape[0]}, d), got {tuple(m.shape)}")
        if c.shape != (m.shape[0], m.shape[1], m.shape[1]):
            raise ValueError(
                f"covs must have shape {(m.shape[0], m.shape[1], m.shape[1])}, got {tuple(c.shape)}"
            )
        if not (torch.isfinite(w).all() and torch.isfinite(m).all() and torch.isfinite(c).all()):
            raise ValueError("weights, means and covs must be finite")
        if (w <= 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1, got {w.tolist()}")
        if not torch.allclose(c, c.transpose(-1, -2), rtol=1e-10, atol=1e-12):
            raise ValueError("covs must be symmetric")
        chol, info = torch.linalg.cholesky_ex(c)
        if (info != 0).any():
            raise ValueError(
                f"covs must be positive definite; components {info.nonzero().flatten().tolist()} are not"
            )
        self._chol = chol  # (K, d, d), reused by sample()

    @property
    def dim(self) -> int:
        """Data dimension d."""
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        """Number of components K."""
        return self.weights.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the mixture (d,)."""
        return self.weights @ self.means

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` samples (n, d), float64; a pure function of the generator's state."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)  # (n, d)
        return self.means[k] + (self._chol[k] @ z.unsqueeze(-1)).squeeze(-1)

    def noised(self, abar: float | torch.Tensor) -> GaussianMixture:
        """The distribution of x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, itself a mixture."""
        a = _as_abar(abar)
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, a.sqrt() * self.means, a * self.covs + (1 - a) * eye)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density (n,) at points ``x`` (n, d)."""
        return torch.logsumexp(self.weights.log() + _component_log_prob(self._chol, self.means, x)[0], dim=1)


def _as_abar(abar: float | torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(abar, dtype=torch.float64)
    if a.ndim != 0 or not 0.0 < float(a) < 1.0:
        raise ValueError(f"abar must be a scalar in (0, 1), got {abar}")
    return a


def _component_log_prob(
    chol: torch.Tensor, centres: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-component log N(x; centre_k, L_k L_k^T) (n, K) and C_k^-1 (x - centre_k) (n, K, d)."""
    d = x.shape[1]
    diff = x[:, None, :] - centres  # (n, K, d)
    cinv = torch.cholesky_inverse(chol)  # (K, d, d); d is small, so an explicit inverse is cheap
    sol = torch.einsum("kij,nkj->nki", cinv, diff)  # (n, K, d)
    logdet = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)  # (K,)
    logp = -0.5 * ((diff * sol).sum(-1) + logdet + d * math.log(2 * math.pi))  # (n, K)
    return logp, sol


def _posterior(gmm: GaussianMixture, x_t: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Responsibilities w_k(x_t) (n, K) and C_k^-1 (x_t - sqrt(abar) mu_k) (n, K, d)."""
    if x_t.ndim != 2 or x_t.shape[1] != gmm.dim:
        raise ValueError(f"x_t must have shape (n, {gmm.dim}), got {tuple(x_t.shape)}")
    noised = gmm.noised(a)
    logp, sol = _component_log_prob(noised._chol, noised.means, x_t.to(torch.float64))
    # Responsibilities in log space: far from the data every component density underflows.
    w = torch.softmax(gmm.weights.log() + logp, dim=1)
    return w, sol


def optimal_x0(gmm: GaussianMixture, x_t: torch.Tensor, abar: float | torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] (n, d), float64, for x0 ~ ``gmm`` and x_t (n, d) at noise level ``abar``."""
    a = _as_abar(abar)
    w, sol = _posterior(gmm, x_t, a)
    post = gmm.means + a.sqrt() * torch.einsum("kij,nkj->nki", gmm.covs, sol)  # (n, K, d)
    return (w[..., None] * post).sum(1)


def optimal_eps(gmm: GaussianMixture, x_t: torch.Tensor, abar: float | torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] (n, d), float64: the MMSE epsilon prediction for x0 ~ ``gmm``."""
    a = _as_abar(abar)
    w, sol = _posterior(gmm, x_t, a)
    # (x_t - sqrt(a) E[x0|x_t,k]) / sqrt(1-a) simplifies to sqrt(1-a) C_k^-1 diff_k, which has no
    # cancellation as abar -> 1 (the subtraction form loses digits when 1 - abar = 1e-4).
    return (1 - a).sqrt() * (w[..., None] * sol).sum(1)


def optimal_score(gmm: GaussianMixture, x_t: torch.Tensor, abar: float | torch.Tensor) -> torch.Tensor:
    """grad log p_t(x_t) (n, d), float64; equals -E[eps | x_t] / sqrt(1 - abar)."""
    a = _as_abar(abar)
    w, sol = _posterior(gmm, x_t, a)
    return -(w[..., None] * sol).sum(1)


def ddpm_alphas_cumprod() -> torch.Tensor:
    """abar (T=1000,) float64 of the default DDPM schedule (linear betas 1e-4..0.02); t=0 least noisy."""
    from difftune.process.schedulers import linear_alphas_cumprod  # lazy: nothing heavy at import time

    return linear_alphas_cumprod()


def transfer_gaps(
    source: GaussianMixture,
    target: GaussianMixture,
    timesteps: Sequence[int] | torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    abar_table: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every gap of :data:`GAP_SPACES` between the source- and target-optimal denoisers, per t.

    x0 ~ target and eps are drawn once and reused at every t (common random numbers), so the
    curves are smooth in t. Each gap is a mean over the n noised target samples, divided by d:

    * ``"x0"``: ||D_s - D_t||^2, D = E[x0 | x_t]: the quantity of the paper's argument.
    * ``"x0_bias"``: ||mean_n(D_s - D_t)||^2, the part of "x0" that survives at t -> T.
    * ``"eps"``: ||eps*_s - eps*_t||^2 = excess epsilon-loss of the source-optimal model.
    * ``"score"``: ||score_s - score_t||^2.
    * ``"relative"``: "eps" divided by the target MMSE E||eps - eps*_t||^2 (same in x0 space).

    Args:
        source, target: the two data distributions (same d).
        timesteps: integer t (L,) indexing ``abar_table``.
        n: number of target samples.
        generator: the random stream for x0 and eps.
        abar_table: abar per t (T,); default :func:`ddpm_alphas_cumprod`.

    Returns:
        ``{space: (L,) float64 tensor}`` for each space in :data:`GAP_SPACES`.
    """
    if source.dim != target.dim:
        raise ValueError(f"source and target differ in dimension ({source.dim} vs {target.dim})")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    table = ddpm_alphas_cumprod() if abar_table is None else torch.as_tensor(abar_table, dtype=torch.float64)
    ts = torch.as_tensor(timesteps, dtype=torch.long).flatten()
    if ts.numel() == 0 or ts.min() < 0 or ts.max() >= table.numel():
        raise ValueError(f"timesteps must be non-empty and in [0, {table.numel() - 1}], got {ts.tolist()}")
    d = target.dim
    x0 = target.sample(n, generator)  # (n, d)
    eps = torch.randn(n, d, generator=generator, dtype=torch.float64)  # (n, d)
    out: dict[str, list[float]] = {space: [] for space in GAP_SPACES}
    for t in ts.tolist():
        a = table[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        eps_t = optimal_eps(target, x_t, a)
        d_eps = optimal_eps(source, x_t, a) - eps_t  # (n, d)
        # Same x_t for both, so D_s - D_t = -sqrt((1 - a) / a) (eps*_s - eps*_t) exactly.
        d_x0 = -((1 - a) / a).sqrt() * d_eps
        g_eps = d_eps.pow(2).sum(1).mean() / d
        out["eps"].append(float(g_eps))
        out["x0"].append(float(d_x0.pow(2).sum(1).mean() / d))
        out["x0_bias"].append(float(d_x0.mean(0).pow(2).sum() / d))
        out["score"].append(float(g_eps / (1 - a)))
        out["relative"].append(float(g_eps / ((eps - eps_t).pow(2).sum(1).mean() / d)))
    return {space: torch.tensor(v, dtype=torch.float64) for space, v in out.items()}


def transfer_gap(
    source: GaussianMixture,
    target: GaussianMixture,
    timesteps: Sequence[int] | torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    abar_table: torch.Tensor | None = None,
    *,
    space: str = "x0",
) -> torch.Tensor:
    """One gap of :func:`transfer_gaps` per t (L,), float64.

    The default ``"x0"`` is the quantity the paper's argument is about (see the module docstring);
    ``"eps"`` is what an epsilon-loss probe measures and is a hump in t, not an increasing curve.
    """
    if space not in GAP_SPACES:
        raise ValueError(f"unknown gap space {space!r}; valid: {', '.join(GAP_SPACES)}")
    return transfer_gaps(source, target, timesteps, n, generator, abar_table)[space]


def single_gaussian_x0_gap(
    source: GaussianMixture, target: GaussianMixture, abar: float | torch.Tensor
) -> tuple[float, float]:
    """Exact x0-space gap for one Gaussian per domain, split as (location term, shape term), per dim.

    With y = x_t / sqrt(abar) = x0 + eps / sqrt(snr), D(y) = m + c (y - m), c = Sigma (Sigma + I/snr)^-1,
    so D_t - D_s = (I - c_s)(m_t - m_s) + (c_t - c_s)(y - m_t) and, over y ~ N(m_t, Sigma_t + I/snr),

        location = ||(I - c_s)(m_t - m_s)||^2 / d     increasing in t: I - c_s = (I + snr Sigma_s)^-1
        shape    = tr[(c_t - c_s)(Sigma_t + I/snr)(c_t - c_s)^T] / d     -> 0 at both ends.
    """
    if source.num_components != 1 or target.num_components != 1:
        raise ValueError("single_gaussian_x0_gap needs one component per distribution")
    if source.dim != target.dim:
        raise ValueError(f"source and target differ in dimension ({source.dim} vs {target.dim})")
    a = _as_abar(abar)
    lam = (1 - a) / a  # 1 / snr
    eye = torch.eye(target.dim, dtype=torch.float64)
    s_s, s_t = source.covs[0], target.covs[0]
    # (Sigma + lam I)^-1 Sigma = Sigma (Sigma + lam I)^-1: the two factors commute.
    c_s = torch.linalg.solve(s_s + lam * eye, s_s)
    c_t = torch.linalg.solve(s_t + lam * eye, s_t)
    loc = (eye - c_s) @ (target.means[0] - source.means[0])
    dc = c_t - c_s
    shape = torch.trace(dc @ (s_t + lam * eye) @ dc.T)
    return float(loc.pow(2).sum() / target.dim), float(shape / target.dim)


def noised_kl(
    p: GaussianMixture,
    q: GaussianMixture,
    abar: float | torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
) -> float:
    """Monte-Carlo KL(p_t || q_t) of the two noised distributions at ``abar`` (x0 ~ p, then noise).

    Draws x0 then eps like :func:`transfer_gaps`, so the same seed gives common random numbers.
    """
    a = _as_abar(abar)
    x0 = p.sample(n, generator)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    return float((p.noised(a).log_prob(x_t) - q.noised(a).log_prob(x_t)).mean())


def is_monotone_increasing(values: Sequence[float] | torch.Tensor, tolerance: float = 0.0) -> bool:
    """Whether ``values`` (L,) never decrease by more than ``tolerance`` times max |values|.

    The tolerance is relative so that it means the same for curves of any scale; 0 asks for a
    non-decreasing sequence.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() < 2:
        return True
    slack = tolerance * float(v.abs().max())
    return bool((v[1:] >= v[:-1] - slack).all())


def random_gmm(
    k: int, d: int, generator: torch.Generator | None = None, spread: float = 2.0
) -> GaussianMixture:
    """A random K-component mixture in d dimensions.

    Means ~ N(0, spread^2 I); covariances are randomly rotated with eigenvalues log-uniform in
    [0.1, 1], so every component is well conditioned; weights ∝ U(0.5, 1.5).
    """
    if k < 1 or d < 1:
        raise ValueError(f"k and d must be >= 1, got k={k}, d={d}")
    w = torch.rand(k, generator=generator, dtype=torch.float64) + 0.5
    means = spread * torch.randn(k, d, generator=generator, dtype=torch.float64)
    # Random rotations (K, d, d) from the QR of Gaussian matrices.
    q, _ = torch.linalg.qr(torch.randn(k, d, d, generator=generator, dtype=torch.float64))
    log_ev = torch.empty(k, d, dtype=torch.float64).uniform_(math.log(0.1), 0.0, generator=generator)
    covs = q @ torch.diag_embed(log_ev.exp()) @ q.transpose(-1, -2)
    covs = 0.5 * (covs + covs.transpose(-1, -2))  # exact symmetry despite rounding
    return GaussianMixture(w / w.sum(), means, covs)
