"""Tests for difftune.metrics: Fréchet distance, feature statistics and the digits feature extractor."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from difftune.data.builtin import load_sklearn_digits
from difftune.metrics import (
    DigitClassifier,
    DigitFeatureExtractor,
    FeatureStats,
    compute_feature_stats,
    fid_from_images,
    fid_from_stats,
    frechet_distance,
    load_classifier,
    save_classifier,
    torchmetrics_fid,
    train_digit_classifier,
)


def _scipy_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Textbook FID with scipy.linalg.sqrtm (real part)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean)))


def _tiny_conv_extractor(seed: int = 0) -> nn.Module:
    """Random-init conv net: (N, 3, 16, 16) -> (N, 8)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ).eval()


class _NaNFeatures(nn.Module):
    """Extractor returning NaN features (N, 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 2), float("nan"))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# --------------------------------------------------------------------------------------------- FID


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    d, n = 16, 200
    a = rng.normal(size=(d, d))
    x = rng.normal(size=(n, d))
    y = rng.normal(loc=0.5, size=(n, d)) @ a / 3
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = _scipy_fid(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)
    # torch inputs give the same answer
    assert frechet_distance(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2))) == pytest.approx(
        ref, rel=1e-6
    )


def test_feature_stats_match_numpy(gen: torch.Generator) -> None:
    images = torch.rand(203, 1, 4, 4, generator=gen)
    stats = compute_feature_stats(images, nn.Flatten(), batch_size=37)
    flat = images.flatten(1).double().numpy()
    assert stats.count == 203
    np.testing.assert_allclose(stats.mu, flat.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(flat, rowvar=False), rtol=0, atol=1e-12)
    # an iterable of batches (e.g. a sampler yielding chunks) gives the same statistics
    chunks = compute_feature_stats(iter(torch.split(images, 50)), nn.Flatten(), batch_size=16, progress=True)
    np.testing.assert_allclose(chunks.mu, stats.mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(chunks.sigma, stats.sigma, rtol=0, atol=1e-12)


def test_fid_matches_torchmetrics(gen: torch.Generator) -> None:
    extractor = _tiny_conv_extractor()
    real = torch.rand(300, 3, 16, 16, generator=gen)
    fake = torch.rand(250, 3, 16, 16, generator=gen) ** 2
    ours = fid_from_images(real, fake, extractor, batch_size=64)
    ref = torchmetrics_fid(real, fake, extractor, batch_size=64)
    assert ours > 0
    assert ours == pytest.approx(ref, rel=1e-4)


def test_fid_self_is_zero_and_monotone_in_shift(gen: torch.Generator) -> None:
    extractor = _tiny_conv_extractor()
    real = torch.rand(400, 3, 16, 16, generator=gen) * 0.5
    stats = compute_feature_stats(real, extractor)
    scale = float(np.trace(stats.sigma))
    assert abs(fid_from_stats(stats, stats)) < 1e-6 * scale
    assert abs(fid_from_images(real, real, extractor)) < 1e-6 * scale

    other = torch.rand(400, 3, 16, 16, generator=gen) * 0.5
    fids = [fid_from_images(stats, other + shift, extractor) for shift in (0.0, 0.1, 0.2, 0.3, 0.45)]
    assert all(a < b for a, b in pairwise(fids)), fids


# ----------------------------------------------------------------------------------- FeatureStats


def test_feature_stats_roundtrip(tmp_path, gen: torch.Generator) -> None:
    stats = compute_feature_stats(torch.rand(50, 1, 3, 3, generator=gen), nn.Flatten())
    path = tmp_path / "sub" / "ref_stats.npz"
    stats.save(path)
    loaded = FeatureStats.load(path, num_features=9)
    assert loaded.count == stats.count
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert [p.name for p in path.parent.iterdir()] == ["ref_stats.npz"]  # no temp file left behind


def test_feature_stats_dimension_mismatch(tmp_path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(4), sigma=np.eye(5), count=np.int64(10))
    with pytest.raises(ValueError, match=r"\(4,\).*\(5, 5\)"):
        FeatureStats.load(bad)

    good = tmp_path / "good.npz"
    FeatureStats(mu=np.zeros(4), sigma=np.eye(4), count=10).save(good)
    with pytest.raises(ValueError, match="file has 4, expected 8"):
        FeatureStats.load(good, num_features=8)
    with pytest.raises(ValueError, match="4 vs 3"):
        fid_from_stats(FeatureStats.load(good), FeatureStats(mu=np.zeros(3), sigma=np.eye(3), count=10))


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.rand(1, 1, 4, 4), "at least 2 images"),
        (torch.rand(5, 4, 4), r"\(N, C, H, W\)"),
        (torch.full((5, 1, 4, 4), float("nan")), "non-finite"),
        (torch.rand(5, 1, 4, 4) * 2 - 1, r"\[0, 1\]"),
        (torch.randint(0, 255, (5, 1, 4, 4), dtype=torch.uint8), "floating-point"),
    ],
)
def test_bad_images_raise(images: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_feature_stats(images, nn.Flatten())


def test_bad_stats_raise() -> None:
    with pytest.raises(ValueError, match="mismatch: 3 vs 4"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.array([0.0, np.inf]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="count >= 2"):
        FeatureStats(mu=np.zeros(2), sigma=np.eye(2), count=1)
    with pytest.raises(ValueError, match="non-finite"):
        compute_feature_stats(torch.rand(4, 1, 2, 2), _NaNFeatures())
    with pytest.raises(ValueError, match=r"shape \(B, D\)"):
        compute_feature_stats(torch.rand(4, 1, 2, 2), nn.Identity())


# ---------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, DigitClassifier]:
    images, labels = load_sklearn_digits()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[perm], labels[perm]
    model = train_digit_classifier(images[:1000], labels[:1000], steps=400, seed=0)
    return images, labels, model


def test_digit_classifier_accuracy(digits) -> None:
    images, labels, model = digits
    assert images.shape == (1797, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert not model.training
    with torch.no_grad():
        acc = (model(images[1000:]).argmax(1) == labels[1000:]).float().mean().item()
    assert acc > 0.9


def test_digit_classifier_deterministic(digits) -> None:
    images, labels, _ = digits
    state = torch.get_rng_state()
    a = train_digit_classifier(images[:200], labels[:200], steps=20, seed=3)
    b = train_digit_classifier(images[:200], labels[:200], steps=20, seed=3)
    c = train_digit_classifier(images[:200], labels[:200], steps=20, seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_digit_fid_separates_classes(digits) -> None:
    images, labels, model = digits
    extractor = DigitFeatureExtractor(model)
    half = len(images) // 2
    fid_halves = fid_from_images(images[:half], images[half:], extractor)
    fid_classes = fid_from_images(images[labels < 5], images[labels >= 5], extractor)
    assert fid_halves * 10 < fid_classes, (fid_halves, fid_classes)


def test_digit_feature_extractor_shapes(digits) -> None:
    images, _, model = digits
    extractor = DigitFeatureExtractor(model)
    extractor.train()
    assert not extractor.training and not model.training
    x = images[:10]
    feats = extractor(x)
    assert feats.shape == (10, extractor.num_features) == (10, 64)
    torch.testing.assert_close(extractor(x.expand(-1, 3, -1, -1)), feats)  # grey RGB == grey
    assert extractor(torch.rand(4, 3, 32, 32)).shape == (4, 64)  # resized to 8x8
    with pytest.raises(ValueError, match="shape"):
        extractor(torch.rand(4, 2, 8, 8))


def test_classifier_save_load(tmp_path, digits) -> None:
    _, _, model = digits
    path = tmp_path / "digits.safetensors"
    save_classifier(model, path)
    loaded = load_classifier(path)
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["digits.safetensors"]
