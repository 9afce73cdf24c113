"""The text-to-image test bed's scores, on the features of one digit classifier that tells upright from
rotated digits (20 classes, trained on the source model's own digits, none of them held out):

- target FID: samples of "sks digit k" (k = 0..9) against held-out rotated digits;
- forgetting: samples of "digit k" against the frozen source model's samples of the same prompts from
  the same seeds (what its ``class_swap`` bank holds), 0 for the source model itself;
- prior FID: samples of "digit k" against held-out upright digits.

Every model is sampled from the same seeds, so differences between methods are paired.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difftune.backbones.family import ConditionRequest
from difftune.backbones.loading import LoadedModel
from difftune.config.sampling import SamplingSpec
from difftune.demos.caption_data import SOURCE_CAPTION, TARGET_CAPTION, DigitSplit, rotated
from difftune.metrics import (
    DigitFeatureExtractor,
    compute_feature_stats,
    fid_from_stats,
    train_digit_classifier,
)
from difftune.metrics.fid import FeatureStats
from difftune.sampling.generate import generate_with_spec, to_unit_range

DIGITS = list(range(10))


def prompt_samples(loaded: LoadedModel, prompt: str, per_class: int, sampling: SamplingSpec) -> torch.Tensor:
    """``per_class`` samples of ``prompt`` for each digit, in [0, 1], from the same seeds for every model."""
    backbone = loaded.backbone.eval()
    rows, _ = loaded.family.sample_conditions(
        loaded, ConditionRequest(prompts=[prompt.format(k) for k in DIGITS])
    )
    cond = rows.select(torch.arange(len(DIGITS)).repeat_interleave(per_class))
    return to_unit_range(generate_with_spec(backbone, loaded.scheduler_config, sampling, cond))


@dataclass
class CaptionScorer:
    """Scores a model of the text-to-image test bed against the references it was built with."""

    per_class: int  # samples of each prompt
    sampling: SamplingSpec
    extractor: DigitFeatureExtractor
    target_reference: FeatureStats  # held-out rotated digits
    prior_reference: FeatureStats  # held-out upright digits
    frozen_prior: FeatureStats  # the source model's samples of "digit k"
    anchor: dict[str, float]  # the source model's own scores

    @classmethod
    def build(
        cls,
        split: DigitSplit,
        source: LoadedModel,
        per_class: int,
        sampling: SamplingSpec,
        classifier_steps: int,
        seed: int,
    ) -> CaptionScorer:
        """The classifier (``classifier_steps`` steps from ``seed``), the references, and the frozen source
        model's samples (``per_class`` of each prompt, drawn as ``sampling`` says) and scores."""
        print("[caption bed] training the evaluation classifier (upright and rotated digits)")
        own = split.images[split.source]
        classifier = train_digit_classifier(
            torch.cat([own, rotated(own)]),
            torch.cat([split.labels[split.source], split.labels[split.source] + 10]),
            steps=classifier_steps,
            seed=seed,
            num_classes=20,
        )
        extractor = DigitFeatureExtractor(classifier)
        held_out = split.images[split.held_out]
        prior = prompt_samples(source, SOURCE_CAPTION, per_class, sampling)
        scorer = cls(
            per_class,
            sampling,
            extractor,
            compute_feature_stats(rotated(held_out), extractor),
            compute_feature_stats(held_out, extractor),
            compute_feature_stats(prior, extractor),
            {},
        )
        scorer.anchor, _ = scorer.score(source, prior)
        return scorer

    def score(
        self, loaded: LoadedModel, prior: torch.Tensor | None = None
    ) -> tuple[dict[str, float], torch.Tensor]:
        """The model's target FID, forgetting score and prior FID, and a grid of its samples (10 of each
        target prompt, then 10 of each source prompt)."""
        target = prompt_samples(loaded, TARGET_CAPTION, self.per_class, self.sampling)
        if prior is None:
            prior = prompt_samples(loaded, SOURCE_CAPTION, self.per_class, self.sampling)
        prior_stats = compute_feature_stats(prior, self.extractor)
        scores = {
            "target_fid": fid_from_stats(
                self.target_reference, compute_feature_stats(target, self.extractor)
            ),
            "forgetting": fid_from_stats(self.frozen_prior, prior_stats),
            "prior_fid": fid_from_stats(self.prior_reference, prior_stats),
        }
        n = self.per_class
        per_row = min(10, n)
        grid = torch.cat(
            [
                images.view(len(DIGITS), n, *images.shape[1:])[:, :per_row].flatten(0, 1)
                for images in (target, prior)
            ]
        )
        return scores, grid
