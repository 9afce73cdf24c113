"""Training-time evaluation (``train.eval_every``, docs/method.md §13): what the model being trained is
worth at a step, measured the same way at every step, so that the curves compare steps and the best
step can be kept (``train.keep_best``).

At fixed seeds, on samples the run never trains on:

* ``eval/loss/target``, ``eval/loss/bank``: the denoising loss per bin of t (the model's own
  parameterisation, the same t and noise every time: :func:`~difftune.schedules.binned_loss.binned_denoising_loss`)
  of held-out target images and held-out bank samples, and its mean over the bins;
* ``eval/fid``, ``eval/kid``: images generated at the reference images' conditions against the
  reference (held-out target images, or statistics from a file), on the features of an extractor;
* ``eval/forgetting``: how far the model has moved from the pre-trained one where retention is
  meant to act. Each probe bank sample is generated again by the model being trained, from the same
  seed, condition and sampler; the score is the mean squared pixel difference (images in [0, 1]),
  0 for the pre-trained model itself. ``eval/forgetting_fid`` compares the two sets on features.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.loading import LoadedModel
from difftune.bank.conditions import RunBank
from difftune.config.evaluation import EvaluationSpec
from difftune.config.sampling import SamplingSpec
from difftune.data.targets import TargetData
from difftune.errors import UserError
from difftune.io.images import to_uint8_rgb
from difftune.sampling.generate import build_scheduler, generate, to_unit_range
from difftune.sampling.shares import gather_rows, share_of_rows
from difftune.schedules.binned_loss import Evaluation, binned_denoising_loss
from difftune.training.outputs import BEST_FILE
from difftune.training.run_dir import BEST_DIR

# train.keep_best -> the score it keeps the lowest of
BEST_KEYS = {
    "fid": "eval/fid",
    "kid": "eval/kid",
    "loss": "eval/loss/target",
    "forgetting": "eval/forgetting",
}


def fixed_choice(total: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random choice of ``count`` of ``total`` items: (the others' indices, the chosen), each sorted."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return order[count:].sort().values, order[:count].sort().values


def hold_out(total: int, count: int, seed: int, setting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fixed_choice` of the items held out of training (``train.evaluation.<setting>``).

    Raises:
        UserError: nothing would be left to train on.
    """
    if count >= total:
        raise UserError(
            f"train.evaluation.{setting}={count} holds out the whole set of {total}; lower it so that "
            "some samples are left to train on"
        )
    return fixed_choice(total, count, seed)


def split_target(target: TargetData, count: int, seed: int) -> tuple[TargetData, TargetData | None]:
    """``target`` without ``count`` held-out images, and those images (``None`` when ``count`` is 0)."""
    if not count:
        return target, None
    kept, held = hold_out(len(target), count, seed, "holdout")
    held_out = target.subset(held)
    held_out = TargetData(held_out.samples[:], held_out.std[:], held_out.cond, held_out.class_names)
    return target.subset(kept), held_out  # the few held-out samples in memory, for every evaluation


def split_bank(bank: RunBank, count: int, seed: int) -> tuple[RunBank, RunBank | None]:
    """``bank`` without ``count`` held-out samples, and those samples (``None`` when ``count`` is 0)."""
    if not count:
        return bank, None
    kept, held = hold_out(len(bank), count, seed, "bank_holdout")
    held_out = bank.split(held)
    return bank.split(kept), dataclasses.replace(held_out, samples=held_out.samples[:])


@dataclass
class LossSet:
    """Samples whose denoising loss is measured, with the conditions training gives them."""

    x0: torch.Tensor
    cond: Conditioning


class TrainingEvaluation:
    """The measurements of one run's evaluation steps (main process only).

    Args:
        spec: what to measure.
        loaded: the model (its codec and noise schedule; the backbone is passed to :meth:`evaluate`).
        sampling: how FID/KID images are sampled (``train.sampling``; image i has seed ``seed + i``).
        losses: the sets whose validation loss is measured, by name (``target``, ``bank``).
        reference: the FID/KID reference images in the diffusion space with their conditions (with
            ``spec.reference``, statistics from a file: only the conditions, which the images are
            sampled at), or ``None`` without FID.
        probe: the bank samples the forgetting score regenerates (with their seeds and sampler), or ``None``.
    """

    def __init__(
        self,
        spec: EvaluationSpec,
        loaded: LoadedModel,
        sampling: SamplingSpec,
        losses: dict[str, LossSet],
        reference: LossSet | None,
        probe: RunBank | None,
    ) -> None:
        self.spec, self.loaded, self.sampling = spec, loaded, sampling
        self.losses, self.reference, self.probe = losses, reference, probe
        self.extractor: nn.Module | None = None
        self.reference_features: torch.Tensor | None = None
        self.reference_stats: Any = None
        self.probe_images: torch.Tensor | None = None  # the probe's bank images, decoded once
        self.probe_stats: Any = None  # and their feature statistics
        self._shared: Any = None  # the accelerator sharing the evaluation under way (sharded runs)
        if spec.features is not None:
            from difftune.metrics.extractors import build_extractor

            self.extractor = build_extractor(spec.features, spec.inception_weights).eval()
            if spec.reference is not None:
                from difftune.metrics.fid import FeatureStats

                if not Path(spec.reference).is_file():
                    raise UserError(
                        f"train.evaluation.reference {spec.reference!r} does not exist; give a .npz of "
                        "`difftune eval fid --save-real-stats`, or leave it unset"
                    )
                self.reference_stats = FeatureStats.load(
                    spec.reference, getattr(self.extractor, "num_features", None)
                )

    @torch.no_grad()
    def evaluate(
        self, backbone: Backbone, device: torch.device | str, shared: Any | None = None
    ) -> dict[str, float]:
        """Score ``backbone`` (in eval mode for the measurement, its mode restored after).

        ``shared``: the accelerator of a sharded run, whose processes share the work; call it on every
        process then (a sharded model's forward pass needs all of them): each samples, decodes and
        featurises its share of the FID and forgetting images
        (:func:`~difftune.sampling.shares.share_of_rows`; image ``i`` keeps its seed), every process
        measures the losses (quietly but for the main one), and the main process gathers the shares and
        returns the scores; the others return none.
        """
        was_training = backbone.training
        backbone.eval()
        self._shared = shared
        try:
            scores: dict[str, float] = {}
            for name, part in self.losses.items():
                scores.update(self._loss(name, part, backbone, device))
            if self.extractor is not None and self.reference is not None:
                scores.update(self._fid(backbone, device))
            if self.probe is not None and self.spec.samples:
                scores.update(self._forgetting(backbone, device))
        finally:
            backbone.train(was_training)
        return scores if self._scores_here else {}

    @property
    def _scores_here(self) -> bool:
        """Whether this process computes the scores (the main one of a launch, or a process on its own)."""
        return self._shared is None or self._shared.is_main_process

    def _share(self, n: int) -> list[int]:
        """The rows of ``n`` this process samples (all of them unless the run is sharded)."""
        return share_of_rows(self._shared, n)[0]

    def _gather(self, rows: torch.Tensor, n: int, device: torch.device | str) -> torch.Tensor:
        """The ``n`` rows of every process's share, on the CPU (collectives run on the device)."""
        return gather_rows(self._shared, rows.to(device), n).cpu()

    def _loss(
        self, name: str, part: LossSet, backbone: Backbone, device: torch.device | str
    ) -> dict[str, float]:
        measured = binned_denoising_loss(
            [Evaluation(backbone, part.x0, part.cond)],
            self.loaded.scheduler_config,
            self.spec.bins,
            seed=self.spec.seed,
            batch_size=self.spec.batch_size,
            device=device,
            desc=f"eval loss ({name})",
            progress=self._scores_here,
        )
        per_bin = measured.losses[:, 0].tolist()
        edges = measured.edges.tolist()
        scores = {f"eval/loss/{name}": float(np.mean(per_bin))}
        for b, value in enumerate(per_bin):
            scores[f"eval/loss/{name}/t{int(edges[b])}-{int(edges[b + 1]) - 1}"] = float(value)
        return scores

    def _images(self, x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Diffusion-space samples -> images in [0, 1] on the CPU."""
        return to_unit_range(self.loaded.codec.decode(x.to(device))).cpu()

    def _features(self, images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Float64 features of images in [0, 1], rounded to 8 bits as `difftune eval fid` scores them."""
        assert self.extractor is not None
        self.extractor.to(device)
        out = []
        for chunk in to_uint8_rgb(images).split(self.spec.batch_size):
            out.append(self.extractor(chunk.to(device).float() / 255.0).double().cpu())
        return torch.cat(out)

    def _sample(
        self,
        backbone: Backbone,
        spec: SamplingSpec,
        cond: Conditioning,
        seeds: list[int],
        device: torch.device | str,
    ) -> torch.Tensor:
        scheduler = build_scheduler(
            spec.scheduler, self.loaded.scheduler_config, backbone.sample_shape, spec.scheduler_options
        )
        parts = []
        for start in range(0, len(seeds), self.spec.batch_size):
            rows = torch.arange(start, min(start + self.spec.batch_size, len(seeds)))
            parts.append(
                generate(
                    backbone,
                    scheduler,
                    cond.select(rows),
                    seeds[start : start + len(rows)],
                    spec.guidance_scale,
                    spec.steps,
                    device,
                ).cpu()
            )
        return torch.cat(parts)

    def _fid(self, backbone: Backbone, device: torch.device | str) -> dict[str, float]:
        from difftune.metrics.fid import fid_from_stats
        from difftune.metrics.kid import kernel_inception_distance, stats_from_features

        assert self.reference is not None
        n = self.spec.samples
        mine = self._share(n)
        cond = self.reference.cond.select(torch.tensor(mine) % self.reference.cond.batch_size)
        seeds = self.sampling.seeds(0, n)
        x = self._sample(backbone, self.sampling, cond, [seeds[i] for i in mine], device)
        features = self._gather(self._features(self._images(x, device), device), n, device)
        if not self._scores_here:
            return {}
        if self.reference_stats is None:  # the reference's features once, then reused at every step
            self.reference_features = self._features(self._images(self.reference.x0, device), device)
            self.reference_stats = stats_from_features(self.reference_features)
        scores = {"eval/fid": fid_from_stats(stats_from_features(features), self.reference_stats)}
        if self.reference_features is not None:
            kid, _, _ = kernel_inception_distance(
                self.reference_features, features, subsets=self.spec.kid_subsets, seed=self.spec.seed
            )
            scores["eval/kid"] = kid
        return scores

    def _forgetting(self, backbone: Backbone, device: torch.device | str) -> dict[str, float]:
        from difftune.metrics.fid import fid_from_stats
        from difftune.metrics.kid import stats_from_features

        probe = self.probe
        assert probe is not None and probe.sampling is not None
        n = min(self.spec.samples, len(probe))
        rows = torch.tensor(self._share(n))
        featurise = self.extractor is not None and n >= 2
        if self.probe_images is None:  # the bank's side never changes: decoded (and featurised) once
            self.probe_images = self._images(probe.samples[rows], device)
            if featurise:
                features = self._gather(self._features(self.probe_images, device), n, device)
                self.probe_stats = stats_from_features(features) if self._scores_here else None
        again = self._sample(
            backbone, probe.sampling, probe.cond.select(rows), probe.seeds[rows].tolist(), device
        )
        new = self._images(again, device)
        # each image's mean squared difference (all the same size: their mean is the whole set's)
        errors = self._gather((new - self.probe_images).pow(2).flatten(1).mean(1).double(), n, device)
        new_features = self._gather(self._features(new, device), n, device) if featurise else None
        if not self._scores_here:
            return {}
        scores = {"eval/forgetting": float(errors.mean())}
        if new_features is not None:
            scores["eval/forgetting_fid"] = fid_from_stats(
                stats_from_features(new_features), self.probe_stats
            )
        return scores


def training_evaluation(
    spec: EvaluationSpec,
    loaded: LoadedModel,
    sampling: SamplingSpec,
    target: TargetData,
    held_target: TargetData | None,
    bank: RunBank,
    held_bank: RunBank | None,
    bank_condition: str,
) -> TrainingEvaluation:
    """The evaluation of a run from its (already split) target set and bank.

    The FID/KID reference is the held-out target set, else as many training images as ``spec.samples``
    (a fixed random choice). The forgetting probe is the held-out bank, else the bank's first samples.
    A held-out bank sample's loss is measured with the condition training gives bank samples
    (``bank.condition``: ``null`` drops it).
    """
    backbone = loaded.backbone
    losses = {}
    if held_target is not None:
        losses["target"] = LossSet(held_target.samples, held_target.cond)
    if held_bank is not None:
        cond = held_bank.cond
        if bank_condition == "null":
            cond = backbone.drop(cond, torch.ones(cond.batch_size, dtype=torch.bool))
        losses["bank"] = LossSet(held_bank.samples, cond)
    reference = None
    if spec.features is not None:
        if held_target is not None:
            reference = LossSet(held_target.samples, held_target.cond)
        else:
            _, chosen = fixed_choice(len(target), min(spec.samples, len(target)), spec.seed)
            reference = LossSet(target.samples[chosen], target.cond.select(chosen))
    probe = held_bank if held_bank is not None else (bank if len(bank) and bank.sampling else None)
    return TrainingEvaluation(spec, loaded, sampling, losses, reference, probe)


class BestModel:
    """The lowest score of ``train.keep_best`` so far, and the ``best/`` folder that holds its model.

    A fresh run starts without a best; a resumed run keeps the best of the steps up to the checkpoint it
    resumes from (a ``best/`` of a later step was made by steps the run does again, so it is dropped and
    found again).

    Args:
        out: the run folder.
        metric: ``train.keep_best``.
        step: the step the run starts from (0 for a fresh run).
    """

    def __init__(self, out: Path, metric: str, step: int) -> None:
        self.folder, self.key, self.metric = out / BEST_DIR, BEST_KEYS[metric], metric
        self.score, self.step = math.inf, -1
        record = self.folder / BEST_FILE
        if step > 0 and record.is_file():
            saved = json.loads(record.read_text())
            if saved.get("metric") == metric and saved["step"] <= step:
                self.score, self.step = float(saved["score"]), int(saved["step"])
        if self.step < 0:
            shutil.rmtree(self.folder, ignore_errors=True)

    def improves(self, scores: dict[str, float]) -> bool:
        """``scores`` holds this metric and beats the best so far (lower is better)."""
        value = scores.get(self.key)
        if value is None:
            raise UserError(
                f"train.keep_best={self.metric} but the evaluation measured no {self.key}; check train.evaluation"
            )
        return math.isfinite(value) and value < self.score

    def record(self, step: int, scores: dict[str, float]) -> dict[str, Any]:
        """Take ``scores`` of ``step`` as the new best; returns what ``best.json`` holds."""
        self.score, self.step = scores[self.key], step
        return {"metric": self.metric, "key": self.key, "score": self.score, "step": step, "scores": scores}
