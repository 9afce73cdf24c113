"""The demos' FID: held-out target digits, on the features of a digit classifier trained on other held-out digits.

The same target pair and seed give the same reference images, features and sampling seeds whatever
the source model, so FIDs are comparable across test beds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from difftune.backbones.base import Backbone
from difftune.backbones.loading import LoadedModel
from difftune.data.targets import few_shot_indices, load_digits_split
from difftune.metrics import (
    DigitFeatureExtractor,
    compute_feature_stats,
    fid_from_stats,
    train_digit_classifier,
)
from difftune.metrics.fid import FeatureStats
from difftune.sampling.generate import generate_with_spec, to_unit_range

if TYPE_CHECKING:
    from difftune.demos.settings import DemoSettings


@dataclass
class DigitsEvaluator:
    """FID on held-out target digits with a digit classifier trained on other held-out digits."""

    extractor: DigitFeatureExtractor
    reference: FeatureStats
    settings: DemoSettings
    reference_images: torch.Tensor  # (M, 1, 8, 8) in [0, 1], held-out target digits
    reference_labels: torch.Tensor  # (M,) target labels 0..K-1

    @classmethod
    def build(cls, s: DemoSettings) -> DigitsEvaluator:
        images, digits = load_digits_split()
        images = (images + 1) / 2  # [0, 1]
        target_classes = torch.tensor(sorted(s.target_classes))
        is_target = torch.isin(digits, target_classes)
        target_idx = is_target.nonzero().flatten()
        # the same few-shot selection as training (labels re-indexed 0..K-1, same seed)
        reindexed = torch.searchsorted(target_classes, digits[target_idx])
        train_idx = target_idx[few_shot_indices(reindexed, s.per_class, s.seed)]
        held_out = target_idx[~torch.isin(target_idx, train_idx)]
        held_out = held_out[torch.randperm(held_out.numel(), generator=torch.Generator().manual_seed(s.seed))]
        reference_idx, classifier_target_idx = (
            held_out[: held_out.numel() // 2],
            held_out[held_out.numel() // 2 :],
        )
        classifier_idx = torch.cat([(~is_target).nonzero().flatten(), classifier_target_idx])
        classifier = train_digit_classifier(
            images[classifier_idx], digits[classifier_idx], steps=s.classifier_steps, seed=s.seed
        )
        extractor = DigitFeatureExtractor(classifier)
        reference = images[reference_idx]
        labels = torch.searchsorted(target_classes, digits[reference_idx])
        return cls(extractor, compute_feature_stats(reference, extractor), s, reference, labels)

    def samples(self, loaded: LoadedModel, guide: Backbone | None = None) -> torch.Tensor:
        """``eval_per_class`` samples per target class in [0, 1], fixed seeds; ``guide``: domain guidance."""
        s, backbone = self.settings, loaded.backbone.eval()
        cond = backbone.condition(torch.arange(len(s.target_classes)).repeat_interleave(s.eval_per_class))
        x = generate_with_spec(backbone, loaded.scheduler_config, s.sampling, cond, guide=guide)
        return to_unit_range(x)

    def fid(self, images: torch.Tensor) -> float:
        return fid_from_stats(self.reference, compute_feature_stats(images, self.extractor))
