"""The ``train.evaluation`` sub-section: what a run measures at its evaluation steps (``train.eval_every``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from difftune.config.checks import _check

BestMetric = Literal["fid", "kid", "loss", "forgetting"]
BEST_METRICS: tuple[str, ...] = get_args(BestMetric)


@dataclass
class EvaluationSpec:
    """What training-time evaluation measures (docs/method.md §13), all at fixed seeds, so that two
    evaluations of the same weights give the same numbers.

    Attributes:
        holdout: target images kept out of training (a fixed random choice, ``seed``); their denoising
            loss per noise-level bin is ``eval/loss/target``, and they are the FID/KID reference.
        bank_holdout: knowledge-bank samples kept out of replay; their denoising loss is
            ``eval/loss/bank``, and they are the forgetting probe.
        bins: equal ranges of t of the validation loss.
        samples: images generated per evaluation for FID/KID (conditions of the reference images) and
            for the forgetting score (conditions and seeds of bank samples); 0 = neither.
        features: the FID/KID feature extractor (``inception``, ``digits:PATH``, ``module:function``,
            as ``difftune eval fid --features``); ``None``: no FID/KID.
        inception_weights: a local file of the FID Inception's weights (``features: inception`` only; as
            ``difftune eval fid --inception-weights``), for machines that cannot download them.
        reference: FID reference statistics (a ``.npz`` of ``difftune eval fid --save-real-stats``) in
            place of the held-out target images (of the training images without ``holdout``).
        seed: seed of the hold-out choice and of the loss's timesteps and noise.
        batch_size: images per model call.
        kid_subsets: subsets KID averages over.
    """

    holdout: int = 0
    bank_holdout: int = 0
    bins: int = 10
    samples: int = 0
    features: str | None = None
    inception_weights: str | None = None
    reference: str | None = None
    seed: int = 0
    batch_size: int = 64
    kid_subsets: int = 20

    def __post_init__(self) -> None:
        for name in ("holdout", "bank_holdout", "samples"):
            value = getattr(self, name)
            _check(value >= 0, f"train.evaluation.{name}={value} must be >= 0")
        _check(self.bins >= 1, f"train.evaluation.bins={self.bins} must be >= 1")
        _check(self.batch_size >= 1, f"train.evaluation.batch_size={self.batch_size} must be >= 1")
        _check(self.kid_subsets >= 1, f"train.evaluation.kid_subsets={self.kid_subsets} must be >= 1")
        _check(
            self.features is None or self.samples >= 2,
            f"train.evaluation.features={self.features!r} scores generated images, but "
            f"train.evaluation.samples={self.samples}: set it to 2 or more (e.g. 256)",
        )
        _check(
            self.inception_weights is None or self.features == "inception",
            "train.evaluation.inception_weights only applies to train.evaluation.features=inception",
        )
        _check(
            self.reference is None or self.features is not None,
            "train.evaluation.reference is FID reference statistics, but train.evaluation.features is not "
            "set: name the extractor the statistics were made with",
        )

    def check_best(self, keep_best: str | None) -> None:
        """``train.keep_best`` names a metric these settings measure.

        Raises:
            ConfigError: the metric is not measured; the message says which setting turns it on.
        """
        if keep_best in ("fid", "kid"):
            _check(
                self.features is not None,
                f"train.keep_best={keep_best} needs train.evaluation.features (e.g. inception) and "
                "train.evaluation.samples",
            )
        if keep_best == "kid":
            _check(
                self.reference is None,
                "train.keep_best=kid needs reference images, not statistics: leave train.evaluation.reference "
                "unset (the held-out target images are the reference)",
            )
        if keep_best == "loss":
            _check(
                self.holdout > 0,
                "train.keep_best=loss scores held-out target images: set train.evaluation.holdout (e.g. 64)",
            )
        if keep_best == "forgetting":
            _check(
                self.samples > 0,
                "train.keep_best=forgetting samples at the bank's seeds: set train.evaluation.samples (e.g. 64)",
            )

    @property
    def reads_bank(self) -> bool:
        """The evaluation needs the knowledge bank (its held-out loss, or the forgetting probe)."""
        return self.bank_holdout > 0 or self.samples > 0
