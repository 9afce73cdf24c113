"""Fréchet distance (FID) between image sets, computed in float64 with any feature extractor.

The pipeline is: images in ``[0, 1]`` -> ``extractor`` -> features ``(N, D)`` -> Gaussian
statistics (mean ``(D,)``, unbiased covariance ``(D, D)``) -> Fréchet distance. The statistics can be
cached on disk with :class:`FeatureStats` so that the reference ("real") set is only encoded once.

:func:`torchmetrics_fid` computes the same quantity through ``torchmetrics`` and exists as a cross-check.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from difftune.errors import UserError
from difftune.io.atomic import atomic_open

__all__ = [
    "FeatureStats",
    "compute_feature_stats",
    "fid_from_images",
    "fid_from_stats",
    "frechet_distance",
    "torchmetrics_fid",
]

# Tolerance when checking that images lie in [0, 1] (allows for float rounding in upstream decoding).
_RANGE_TOL = 1e-4

ArrayLike = np.ndarray | Tensor
ImageSource = Tensor | Iterable[Tensor]


def _to_float64(x: ArrayLike, name: str) -> np.ndarray:
    """Convert a numpy array or torch tensor to a float64 numpy array and check it is finite."""
    arr = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return arr


def _sqrt_psd(mat: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix ``(D, D)``.

    Tiny negative eigenvalues produced by rounding are clipped to zero.
    """
    eigval, eigvec = np.linalg.eigh(mat)
    return (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``, computed in float64.

    ``d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})``. The trace of the matrix
    square root is evaluated as ``sum(sqrt(eig(sqrt(sigma1) sigma2 sqrt(sigma1))))``, which has the same
    eigenvalues as ``sigma1 sigma2`` but is symmetric PSD, so it is stable and real even for singular
    covariances. The result is clipped at 0 (it is a squared distance; negatives are rounding error).

    Args:
        mu1: mean of the first distribution, shape ``(D,)`` (numpy array or torch tensor).
        sigma1: covariance of the first distribution, shape ``(D, D)``.
        mu2: mean of the second distribution, shape ``(D,)``.
        sigma2: covariance of the second distribution, shape ``(D, D)``.

    Returns:
        The squared Fréchet distance as a Python float.

    Raises:
        ValueError: on wrong shapes, mismatched feature dimensions or non-finite values.
    """
    m1, s1 = _to_float64(mu1, "mu1"), _to_float64(sigma1, "sigma1")
    m2, s2 = _to_float64(mu2, "mu2"), _to_float64(sigma2, "sigma2")
    for name, m, s in (("1", m1, s1), ("2", m2, s2)):
        if m.ndim != 1 or s.shape != (m.shape[0], m.shape[0]):
            raise ValueError(
                f"expected mu{name} of shape (D,) and sigma{name} of shape (D, D), "
                f"got {tuple(m.shape)} and {tuple(s.shape)}"
            )
    if m1.shape != m2.shape:
        raise ValueError(f"feature dimension mismatch: {m1.shape[0]} vs {m2.shape[0]}")

    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    sqrt_s1 = _sqrt_psd(s1)
    inner = sqrt_s1 @ s2 @ sqrt_s1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = m1 - m2
    fid = float(diff @ diff) + float(np.trace(s1)) + float(np.trace(s2)) - 2.0 * tr_covmean
    return max(fid, 0.0)


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set.

    Attributes:
        mu: feature mean, float64 array of shape ``(D,)``.
        sigma: unbiased feature covariance (normalised by ``count - 1``), float64 array ``(D, D)``.
        count: number of samples the statistics were computed from.
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    def __post_init__(self) -> None:
        self.mu = _to_float64(self.mu, "mu")
        self.sigma = _to_float64(self.sigma, "sigma")
        self.count = int(self.count)
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0], self.mu.shape[0]):
            raise ValueError(
                f"inconsistent feature dimensions: mu has shape {tuple(self.mu.shape)}, "
                f"sigma has shape {tuple(self.sigma.shape)} (expected (D,) and (D, D))"
            )
        if self.count < 2:
            raise ValueError(f"FeatureStats needs count >= 2, got {self.count}")

    @property
    def num_features(self) -> int:
        """Feature dimension ``D``."""
        return int(self.mu.shape[0])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the statistics to a ``.npz`` file (keys ``mu``, ``sigma``, ``count``) atomically.

        The data is written to a temporary file in the same directory and moved into place with
        ``os.replace``, so an interrupted save never leaves a truncated file at ``path``.
        """
        with atomic_open(path) as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))

    @classmethod
    def load(cls, path: str | os.PathLike[str], num_features: int | None = None) -> FeatureStats:
        """Read statistics written by :meth:`save`.

        Args:
            path: the ``.npz`` file.
            num_features: if given, the expected feature dimension ``D``.

        Raises:
            ValueError: if keys are missing, ``mu``/``sigma`` shapes disagree, or ``D != num_features``.
        """
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                missing = {"mu", "sigma", "count"} - set(data.files)
                if missing:
                    raise UserError(f"{path}: not a FeatureStats file, missing keys {sorted(missing)}")
                mu, sigma, count = data["mu"], data["sigma"], int(data["count"])
        except UserError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise UserError(f"{path}: not a readable statistics .npz file ({err})") from None
        try:
            stats = cls(mu=mu, sigma=sigma, count=count)
        except ValueError as err:
            raise UserError(f"{path}: {err}") from None
        if num_features is not None and stats.num_features != num_features:
            raise UserError(
                f"{path}: feature dimension mismatch, file has {stats.num_features}, expected {num_features}"
            )
        return stats


def fid_from_stats(stats1: FeatureStats, stats2: FeatureStats) -> float:
    """Fréchet distance between two :class:`FeatureStats` (see :func:`frechet_distance`).

    Raises:
        ValueError: if the two statistics have different feature dimensions.
    """
    if stats1.num_features != stats2.num_features:
        raise ValueError(f"feature dimension mismatch: {stats1.num_features} vs {stats2.num_features}")
    return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)


def _check_images(batch: Tensor) -> None:
    """Validate one image batch ``(B, C, H, W)``: floating point, finite, values in ``[0, 1]``."""
    if not isinstance(batch, Tensor):
        raise ValueError(f"expected image batches to be torch.Tensor, got {type(batch).__name__}")
    if batch.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got shape {tuple(batch.shape)}")
    if not batch.is_floating_point():
        raise ValueError(f"expected floating-point images in [0, 1], got dtype {batch.dtype}")
    if batch.numel() == 0:
        return
    if not bool(torch.isfinite(batch).all()):
        raise ValueError("images contain non-finite values (NaN or inf)")
    lo, hi = float(batch.min()), float(batch.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(f"expected images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")


def _iter_batches(images: ImageSource, batch_size: int) -> Iterator[Tensor]:
    """Yield validated batches of at most ``batch_size`` images from a tensor or an iterable of tensors.

    Elements of an iterable may be tuples/lists (e.g. from a ``DataLoader`` over a ``TensorDataset``);
    their first element is taken as the images.
    """
    chunks: Iterable[Tensor] = [images] if isinstance(images, Tensor) else images
    for chunk in chunks:
        if isinstance(chunk, (tuple, list)):
            chunk = chunk[0]
        _check_images(chunk)
        yield from torch.split(chunk, batch_size)


def _num_batches(images: ImageSource, batch_size: int) -> int | None:
    """Number of batches for the progress bar, when it can be known up front."""
    if isinstance(images, Tensor):
        return math.ceil(images.shape[0] / batch_size) if images.ndim >= 1 else None
    try:
        return len(images)  # type: ignore[arg-type]
    except TypeError:
        return None


@torch.no_grad()
def compute_feature_stats(
    images: ImageSource,
    extractor: nn.Module,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> FeatureStats:
    """Stream images through ``extractor`` and return the Gaussian statistics of its features.

    Features are accumulated in float64 using sums shifted by the first batch's mean (numerically
    stabler than raw second moments). The covariance is unbiased (``N - 1``), as in torchmetrics.

    Args:
        images: float images in ``[0, 1]``, either one tensor ``(N, C, H, W)`` or an iterable of
            tensors ``(B, C, H, W)`` (e.g. a generator of sampled batches or a ``DataLoader``).
        extractor: module mapping ``(B, C, H, W)`` images to features ``(B, D)``. It is put in eval
            mode and moved to ``device``.
        batch_size: maximum number of images per forward pass.
        device: device the extractor runs on.
        progress: show a tqdm progress bar.

    Returns:
        :class:`FeatureStats` with ``mu (D,)``, ``sigma (D, D)`` and ``count = N``.

    Raises:
        ValueError: on fewer than 2 images, non-4-D/non-float/non-finite/out-of-range images, or
            extractor outputs that are not finite ``(B, D)`` matrices with a constant ``D``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    extractor.eval()
    extractor.to(device)

    batches: Iterable[Tensor] = _iter_batches(images, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=_num_batches(images, batch_size), desc="features", unit="batch")

    count = 0
    shift: Tensor | None = None  # (D,) float64
    sum_: Tensor | None = None  # (D,) float64, sum of shifted features
    outer: Tensor | None = None  # (D, D) float64, sum of outer products of shifted features
    for batch in batches:
        if batch.shape[0] == 0:
            continue
        feats = extractor(batch.to(device))
        if not isinstance(feats, Tensor) or feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
            shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise ValueError(
                f"extractor must return features of shape (B, D) with B={batch.shape[0]}, got {shape}"
            )
        feats = feats.detach().to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(feats).all()):
            raise ValueError("extractor returned non-finite features (NaN or inf)")
        if shift is None:
            shift = feats.mean(dim=0)
            sum_ = torch.zeros_like(shift)
            outer = torch.zeros(shift.shape[0], shift.shape[0], dtype=torch.float64)
        elif feats.shape[1] != shift.shape[0]:
            raise ValueError(
                f"feature dimension changed between batches: {shift.shape[0]} vs {feats.shape[1]}"
            )
        centered = feats - shift
        sum_ += centered.sum(dim=0)
        outer += centered.T @ centered
        count += feats.shape[0]

    if count < 2 or shift is None or sum_ is None or outer is None:
        raise ValueError(f"need at least 2 images to estimate feature statistics, got {count}")
    mean_c = sum_ / count
    sigma = (outer - count * torch.outer(mean_c, mean_c)) / (count - 1)
    sigma = (sigma + sigma.T) / 2
    return FeatureStats(mu=(shift + mean_c).numpy(), sigma=sigma.numpy(), count=count)


def fid_from_images(
    real: ImageSource | FeatureStats,
    fake: ImageSource | FeatureStats,
    extractor: nn.Module,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> float:
    """FID between two image sets (or precomputed :class:`FeatureStats`) under ``extractor``.

    Args:
        real: reference images in ``[0, 1]`` — tensor ``(N, C, H, W)``, iterable of ``(B, C, H, W)``
            tensors, or cached :class:`FeatureStats` computed with the same extractor.
        fake: generated images (or stats), same conventions as ``real``.
        extractor: feature extractor ``(B, C, H, W) -> (B, D)``.
        batch_size: images per forward pass.
        device: device the extractor runs on.

    Returns:
        The Fréchet distance between the two feature distributions.
    """
    stats = [
        s if isinstance(s, FeatureStats) else compute_feature_stats(s, extractor, batch_size, device)
        for s in (real, fake)
    ]
    return fid_from_stats(stats[0], stats[1])


class _TorchmetricsExtractor(nn.Module):
    """Adapter giving torchmetrics' FID a custom extractor that always sees float images in ``[0, 1]``.

    torchmetrics passes images to a custom module unchanged (``normalize=True`` does *not* rescale for
    custom modules) and, at construction, calls the module once on a dummy image
    ``torch.rand(1, *input_img_size)`` (float32 when ``normalize=True``, uint8 in ``[0, 255)`` otherwise)
    to infer the feature dimension — in whatever train/eval mode the module is in, with autograd on.
    This wrapper converts uint8 inputs to ``[0, 1]`` floats and pins the extractor to eval mode with
    gradients disabled, so that dummy call cannot e.g. update BatchNorm running statistics.
    """

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor.eval()

    def train(self, mode: bool = True) -> _TorchmetricsExtractor:
        """Ignore ``mode``: the wrapped extractor always stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Map images ``(B, C, H, W)`` (float in ``[0, 1]`` or uint8) to features ``(B, D)``."""
        if not images.is_floating_point():
            images = images.float() / 255.0
        return self.extractor(images)


def torchmetrics_fid(real: Tensor, fake: Tensor, extractor: nn.Module, batch_size: int = 256) -> float:
    """Reference FID via ``torchmetrics.image.fid.FrechetInceptionDistance`` with a custom extractor.

    Intended as a cross-check of :func:`fid_from_images`; runs on the CPU.

    Args:
        real: reference images, float tensor ``(N, C, H, W)`` in ``[0, 1]``.
        fake: generated images, float tensor ``(M, C, H, W)`` in ``[0, 1]``, same ``(C, H, W)``.
        extractor: feature extractor ``(B, C, H, W) -> (B, D)``.
        batch_size: images per ``update`` call.

    Returns:
        torchmetrics' FID value (torchmetrics casts it to the extractor's output dtype, usually float32).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    for imgs in (real, fake):
        _check_images(imgs)
        if imgs.shape[0] < 2:
            raise ValueError(f"need at least 2 images per set to compute FID, got {imgs.shape[0]}")
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(
            f"real and fake image shapes differ: {tuple(real.shape[1:])} vs {tuple(fake.shape[1:])}"
        )

    extractor.to("cpu")
    metric = FrechetInceptionDistance(
        feature=_TorchmetricsExtractor(extractor),
        normalize=True,
        input_img_size=tuple(real.shape[1:]),
    )
    for imgs, is_real in ((real, True), (fake, False)):
        for batch in torch.split(imgs.cpu(), batch_size):
            metric.update(batch, real=is_real)
    return float(metric.compute())
