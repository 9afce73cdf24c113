"""draft"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class GaussianMixture:
    weights: torch.Tensor
    means: torch.Tensor
    covs: torch.Tensor

    def __post_init__(self) -> None:
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.covs = torch.as_tensor(self.covs, dtype=torch.float64)
        self._chol = torch.linalg.cholesky(self.covs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + (self._chol[k] @ z.unsqueeze(-1)).squeeze(-1)


def _posterior(gmm, x_t, abar):
    a = torch.as_tensor(abar, dtype=torch.float64)
    d = gmm.dim
    eye = torch.eye(d, dtype=torch.float64)
    C = a * gmm.covs + (1 - a) * eye
    L = torch.linalg.cholesky(C)
    diff = x_t[:, None, :] - a.sqrt() * gmm.means
    sol = torch.cholesky_solve(diff.transpose(0, 1).transpose(1, 2), L).transpose(1, 2).transpose(0, 1)  # (n,K,d)
    logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    logn = -0.5 * (diff * sol).sum(-1) - 0.5 * logdet - 0.5 * d * math.log(2 * math.pi)
    w = torch.softmax(torch.log(gmm.weights) + logn, dim=1)
    return w, sol, a


def optimal_x0(gmm, x_t, abar):
    w, sol, a = _posterior(gmm, x_t, abar)
    post = gmm.means + a.sqrt() * torch.einsum("kij,nkj->nki", gmm.covs, sol)
    return (w[..., None] * post).sum(1)


def optimal_eps(gmm, x_t, abar):
    w, sol, a = _posterior(gmm, x_t, abar)
    return (1 - a).sqrt() * (w[..., None] * sol).sum(1)


def random_gmm(k, d, generator, spread=2.0):
    w = torch.rand(k, generator=generator, dtype=torch.float64) + 0.5
    means = spread * torch.randn(k, d, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(k, d, d, generator=generator, dtype=torch.float64))
    ev = torch.exp(torch.empty(k, d, dtype=torch.float64).uniform_(math.log(0.1), 0.0, generator=generator))
    covs = q @ torch.diag_embed(ev) @ q.transpose(-1, -2)
    return GaussianMixture(w / w.sum(), means, covs)
