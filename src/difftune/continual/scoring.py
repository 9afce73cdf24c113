"""FID of a sequence's models on each task: the measures taken after every stage (docs/method.md §14).

A task's FID compares ``continual.samples_per_class`` images of each of its classes (its label rows,
fixed seeds: ``continual.sampling``) with its reference images: the images the few-shot choice left
out of training (``reference: held_out``) or its training images. The source task's classes are the
original model's label rows, and its reference is ``continual.source_data`` or, without it, the
original model's bank. References are computed once per sequence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from difftune.backbones.loading import LoadedModel
from difftune.config.data import DataConfig
from difftune.config.sections import build_section
from difftune.continual.plan import SequencePlan
from difftune.data.targets import few_shot_indices, load_target_images
from difftune.errors import UserError
from difftune.metrics.fid import FeatureStats, compute_feature_stats, fid_from_stats
from difftune.sampling.generate import generate_with_spec, to_unit_range


@dataclass(frozen=True)
class TaskClasses:
    """A task as the model sees it: its first label row and its number of classes."""

    first_row: int
    count: int

    @property
    def rows(self) -> torch.Tensor:
        """The label rows of its classes."""
        return torch.arange(self.first_row, self.first_row + self.count)


def _fixed_subset(images: torch.Tensor, cap: int, seed: int) -> torch.Tensor:
    """At most ``cap`` of ``images``, a fixed random choice (all of them, in order, when they fit)."""
    if images.shape[0] <= cap:
        return images
    keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:cap]
    return images[keep.sort().values]


def reference_images(plan: SequencePlan, data: DataConfig, resolution: int, channels: int) -> torch.Tensor:
    """A task's reference images in ``[0, 1]``: held out by its few-shot choice, or its training images.

    Raises:
        UserError: ``reference: held_out`` for data without a few-shot choice, or nothing left out.
    """
    spec = plan.spec
    if spec.reference == "held_out":
        if data.per_class is None or data.source == "photo_patches":
            raise UserError(
                f"continual.reference=held_out scores a task on the images its few-shot choice left out, but "
                f"data.source={data.source} with data.per_class={data.per_class} leaves none out: set "
                "data.per_class (a few-shot choice), or continual.reference=training"
            )
        full = load_target_images(dataclasses.replace(data, per_class=None), resolution, channels)
        chosen = few_shot_indices(full.labels, data.per_class, data.seed)  # as training chose them
        held = torch.ones(len(full), dtype=torch.bool)
        held[chosen] = False
        if not held.any():
            raise UserError(
                f"data.per_class={data.per_class} keeps every image of the task {data.classes or data.path}: "
                "nothing is left to score on; lower data.per_class or set continual.reference=training"
            )
        indices = held.nonzero().flatten()
        images = full.load(_fixed_subset(indices, spec.max_reference, spec.seed))
    else:
        target = load_target_images(data, resolution, channels)
        images = target.load(_fixed_subset(torch.arange(len(target)), spec.max_reference, spec.seed))
    return to_unit_range(images)


class TaskScorer:
    """FID of any model of the sequence on any task, against references computed once.

    Args:
        plan: the sequence.
        extractor: the feature extractor (``continual.features``).
        device: where models run.
    """

    def __init__(self, plan: SequencePlan, extractor: torch.nn.Module, device: torch.device | str) -> None:
        self.plan, self.extractor, self.device = plan, extractor.to(device).eval(), device
        self._references: dict[int, FeatureStats] = {}

    def _stats(self, images: torch.Tensor) -> FeatureStats:
        return compute_feature_stats(images, self.extractor, self.plan.spec.batch_size, self.device)

    def add_reference(self, task: int, images: torch.Tensor) -> None:
        """Set task ``task``'s reference (images in ``[0, 1]``; task 0 is the source)."""
        if images.shape[0] < 2:
            raise UserError(f"task {task} has {images.shape[0]} reference image(s); FID needs 2 or more")
        self._references[task] = self._stats(images)

    def has_reference(self, task: int) -> bool:
        """Task ``task``'s reference is computed."""
        return task in self._references

    @torch.no_grad()
    def images(self, loaded: LoadedModel, classes: TaskClasses) -> torch.Tensor:
        """``samples_per_class`` images in ``[0, 1]`` of each class of a task, at fixed seeds (at most
        ``max_reference`` in all: a task of many classes gets its classes in turn)."""
        spec, backbone = self.plan.spec, loaded.backbone.to(self.device).eval()
        codec = loaded.codec.to(self.device)
        labels = classes.rows.repeat_interleave(spec.samples_per_class)
        if labels.numel() > spec.max_reference:  # many classes (ImageNet's 1000): spread evenly instead
            labels = classes.rows[torch.arange(spec.max_reference) % classes.count]
        out = []
        for start in range(0, labels.numel(), spec.batch_size):
            cond = backbone.condition(labels[start : start + spec.batch_size])
            x = generate_with_spec(backbone, loaded.scheduler_config, spec.sampling, cond, start, self.device)
            out.append(to_unit_range(codec.decode(x)).cpu())
        return torch.cat(out)

    def score(self, loaded: LoadedModel, task: int, classes: TaskClasses) -> float:
        """FID of ``loaded`` on task ``task`` (its classes at label rows ``classes``)."""
        return fid_from_stats(self._references[task], self._stats(self.images(loaded, classes)))


def source_reference(
    plan: SequencePlan, loaded: LoadedModel, resolution: int, channels: int, bank: str | None
) -> torch.Tensor:
    """The source task's reference images in ``[0, 1]``: ``continual.source_data``'s, or the samples of
    the original model's bank (``bank``), decoded by ``loaded``'s codec.

    Raises:
        UserError: neither is available.
    """
    spec = plan.spec
    if spec.source_data is not None:
        data = build_section(DataConfig, dict(spec.source_data), "continual.source_data")[0]
        target = load_target_images(data, resolution, channels)
        images = target.load(_fixed_subset(torch.arange(len(target)), spec.max_reference, spec.seed))
        return to_unit_range(images)
    if bank is None:
        raise UserError(
            "the source task is scored against continual.source_data or the original model's bank, and "
            "this sequence has neither: set continual.source_data (e.g. {source: digits, classes: [0, 1]})"
        )
    from difftune.io.store import LatentStore

    samples = LatentStore(bank).load()["samples"][: spec.max_reference]
    with torch.no_grad():
        return torch.cat(
            [to_unit_range(loaded.codec.decode(x)).cpu() for x in samples.split(spec.batch_size)]
        )
