"""Evaluation metrics: Fréchet distance (FID) with pluggable feature extractors."""

from difftune.metrics.digits import (
    DigitClassifier,
    DigitFeatureExtractor,
    load_classifier,
    save_classifier,
    train_digit_classifier,
)
from difftune.metrics.fid import (
    FeatureStats,
    compute_feature_stats,
    fid_from_images,
    fid_from_stats,
    frechet_distance,
    torchmetrics_fid,
)

__all__ = [
    "DigitClassifier",
    "DigitFeatureExtractor",
    "FeatureStats",
    "compute_feature_stats",
    "fid_from_images",
    "fid_from_stats",
    "frechet_distance",
    "load_classifier",
    "save_classifier",
    "torchmetrics_fid",
    "train_digit_classifier",
]

# the FID Inception-v3 extractor (torchmetrics / torch-fidelity), with a local weights path for offline use
from difftune.metrics.inception import InceptionFeatureExtractor, inception_extractor  # noqa: E402

__all__ += ["InceptionFeatureExtractor", "inception_extractor"]
