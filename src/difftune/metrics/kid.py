"""Distribution metrics on extracted features besides FID: KID and improved precision/recall."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from difftune.metrics.fid import FeatureStats


def stats_from_features(features: np.ndarray | Tensor) -> FeatureStats:
    """Gaussian statistics (float64 mean ``(D,)``, unbiased covariance ``(D, D)``) of features ``(N, D)``."""
    f = features.double().numpy() if isinstance(features, Tensor) else np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N, D) with N >= 2, got {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError("the feature extractor returned non-finite features (NaN or inf)")
    mu = f.mean(axis=0)
    centered = f - mu
    return FeatureStats(mu=mu, sigma=centered.T @ centered / (f.shape[0] - 1), count=f.shape[0])


def kernel_inception_distance(
    real: np.ndarray | Tensor,
    fake: np.ndarray | Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float, int]:
    """KID (Bińkowski et al., 2018): the unbiased MMD^2 with kernel ``(x.y / D + 1)^3``, averaged over subsets.

    The same estimator as torchmetrics' ``KernelInceptionDistance`` (its ``poly_mmd``), but on given
    features, with a seeded generator, and with ``subset_size`` lowered to the smaller set's size
    (torchmetrics raises instead).

    Args:
        real: reference features ``(N, D)``.
        fake: generated features ``(M, D)``.
        subsets: number of random subsets.
        subset_size: images per subset (capped at ``min(N, M)``).
        seed: seed of the subset draws.

    Returns:
        ``(mean, std)`` over subsets (population std, as torchmetrics) and the subset size used.
    """
    from torchmetrics.image.kid import poly_mmd

    r, f = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"expected features (N, D) and (M, D), got {tuple(r.shape)} and {tuple(f.shape)}")
    m = min(subset_size, r.shape[0], f.shape[0])
    if m < 2 or subsets < 1:
        raise ValueError(f"KID needs subsets >= 1 and at least 2 images per set, got {subsets} and {m}")
    gen = torch.Generator().manual_seed(seed)
    scores = torch.stack(
        [
            poly_mmd(
                r[torch.randperm(r.shape[0], generator=gen)[:m]],
                f[torch.randperm(f.shape[0], generator=gen)[:m]],
            )
            for _ in range(subsets)
        ]
    )
    return float(scores.mean()), float(scores.std(unbiased=False)), m


@torch.no_grad()
def precision_recall(
    real: np.ndarray | Tensor,
    fake: np.ndarray | Tensor,
    k: int = 3,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with ``k``-NN feature manifolds.

    Each set's manifold is the union of balls around its points with radius the distance to the point's
    ``k``-th nearest neighbour. Precision: share of fake points inside the real manifold; recall: share of
    real points inside the fake manifold. Exact, in blocks of ``batch_size`` rows: O((N + M)^2 D) time.

    Returns:
        ``(precision, recall)``, each in ``[0, 1]``.
    """
    r = torch.as_tensor(real, dtype=torch.float32).to(device)  # (N, D)
    f = torch.as_tensor(fake, dtype=torch.float32).to(device)  # (M, D)
    if min(r.shape[0], f.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set")

    def radii(x: Tensor) -> Tensor:  # (n,): distance to the k-th neighbour; +1 skips the point itself
        return torch.cat([torch.cdist(b, x).kthvalue(k + 1, dim=1).values for b in x.split(batch_size)])

    def covered(queries: Tensor, points: Tensor, rad: Tensor) -> float:
        inside = [(torch.cdist(b, points) <= rad[None]).any(dim=1) for b in queries.split(batch_size)]
        return float(torch.cat(inside).float().mean())

    return covered(f, r, radii(r)), covered(r, f, radii(f))
