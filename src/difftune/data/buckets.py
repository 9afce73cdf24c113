"""Aspect-ratio buckets of a target set (``data.buckets``): the buckets, which image goes in which, and
the rows of every bucket's cache in one index space.

The buckets are kohya sd-scripts' (``make_bucket_resolutions``): at a budget of ``resolution``² pixels,
every width from ``min_side`` to ``max_side`` in steps of ``step`` with the tallest height (a multiple of
``step``, at most ``max_side``) within the budget, both ways round, and the square. An image goes to the
bucket nearest its aspect ratio (the smallest ``|log(w/h) - log(W/H)|``; a tie to the first in
(width, height) order), is resized to cover it and centre-cropped (:func:`~difftune.io.images.load_cover_image`).
Each bucket is cached apart (its latents have their own size), and a training step draws its target
rows, and its bank rows, from one bucket (:class:`~difftune.training.streams.BucketStreams`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from difftune.config.data import BucketSettings
from difftune.errors import UserError
from difftune.io.mapped import MappedRows

logger = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Bucket:
    """A bucket's size in pixels."""

    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def folder(self) -> str:
        """The sub-folder of a target cache or bank that holds this bucket's rows."""
        return f"bucket-{self.name}"

    def sample_shape(self, channels: int, downsample: int) -> tuple[int, int, int]:
        """(C, H, W) of the samples its images encode to (``downsample``: the codec's factor)."""
        return (channels, self.height // downsample, self.width // downsample)


def bucket_sizes(resolution: int, settings: BucketSettings) -> list[Bucket]:
    """Every bucket at a budget of ``resolution``² pixels, sorted by (width, height)."""
    low, high = settings.sides(resolution)
    step, area = settings.step, resolution * resolution
    found = {Bucket(resolution, resolution)}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            found |= {Bucket(width, height), Bucket(height, width)}
    return sorted(found)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[Bucket]) -> int:
    """The index of the bucket nearest the aspect ratio of an image of ``size`` = (width, height)."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i].width / buckets[i].height) - ratio))


@dataclass
class BucketPlan:
    """The buckets a set's images fall into.

    Attributes:
        buckets: the buckets holding at least one image, sorted by (width, height).
        members: the indices of each bucket's images (sorted), in the set's order.
        resolution: the budget's side (``data.resolution``).
    """

    buckets: list[Bucket]
    members: list[torch.Tensor]
    resolution: int

    @property
    def counts(self) -> list[int]:
        return [len(m) for m in self.members]

    def line(self) -> str:
        """The buckets and their image counts, in one line."""
        each = ", ".join(f"{b.name} ({n})" for b, n in zip(self.buckets, self.counts, strict=True))
        return f"{len(self.buckets)} of {self.resolution}² px: {each}"


def plan_buckets(sizes: Sequence[tuple[int, int]], resolution: int, settings: BucketSettings) -> BucketPlan:
    """The bucket of each image of ``sizes`` ((width, height) each)."""
    every = bucket_sizes(resolution, settings)
    chosen = torch.tensor([nearest_bucket(size, every) for size in sizes], dtype=torch.long)
    used = sorted(set(chosen.tolist()))
    return BucketPlan([every[i] for i in used], [(chosen == i).nonzero().flatten() for i in used], resolution)


def check_bucket_model(backbone: object, downsample: int, settings: BucketSettings) -> None:
    """Refuse buckets for a model that trains and samples at its own size only, or a step its codec cannot encode.

    Raises:
        UserError: the model's family does not take other sizes (``Backbone.size_buckets``), or
            ``data.buckets.step`` is not a multiple of the codec's downsampling factor.
    """
    if not getattr(backbone, "size_buckets", False):
        name = getattr(getattr(backbone, "family", None), "name", type(backbone).__name__)
        raise UserError(
            f"data.buckets: the {name} model family trains and samples at its own size only, so its batches "
            "cannot take other aspect ratios; set data.buckets.enabled=false"
        )
    if settings.step % downsample:
        raise UserError(
            f"data.buckets.step={settings.step} is not a multiple of the VAE's downsampling factor "
            f"{downsample}: use a multiple of {downsample} (64 for Stable Diffusion)"
        )


def check_bucket_fit(backbone: Any, buckets: Sequence[Bucket], downsample: int) -> None:
    """Refuse buckets the model cannot take (:meth:`~difftune.backbones.base.Backbone.bucket_problem`: an
    SD3 latent beyond its positions, a Flux latent with an odd side). A flow shift that depends on the
    resolution (Flux's) is no reason: each bucket is noised on its own size's σ grid
    (:meth:`~difftune.process.flow.FlowProcess.sigmas_for`).

    Raises:
        UserError: the first such bucket.
    """
    channels = backbone.sample_shape[0]
    for bucket in buckets:
        problem = backbone.bucket_problem(bucket.sample_shape(channels, downsample))
        if problem:
            raise UserError(
                f"data.buckets: the model cannot take the bucket {bucket.name}: {problem}; lower "
                "data.buckets.max_side"
            )


def largest_bucket(buckets: Sequence[Bucket]) -> Bucket:
    """The bucket of most pixels, so of most latent elements (of equal ones the first in (width, height)
    order): the size the dry run's memory estimate traces."""
    return max(buckets, key=lambda b: b.width * b.height)


def bucket_weights(counts: Sequence[int], need: int, buckets: Sequence[Bucket]) -> torch.Tensor:
    """How often a step draws from each bucket: its row count, or 0 for a bucket with fewer rows than
    ``need`` (the largest target part of a step), which is left out of training with a warning.

    Raises:
        UserError: no bucket holds ``need`` rows.
    """
    small = [f"{b.name} ({n})" for b, n in zip(buckets, counts, strict=True) if n < need]
    if len(small) == len(counts):
        raise UserError(
            f"data.buckets: no bucket holds the {need} target images a step takes (buckets: {', '.join(small)}); "
            "lower train.batch_size, add images, or widen the buckets (data.buckets.step)"
        )
    if small:
        logger.warning(
            "data.buckets: left out of training, as they hold fewer than the %d target images a step takes: %s",
            need,
            ", ".join(small),
        )
    return torch.tensor([float(n) if n >= need else 0.0 for n in counts])


def bank_shares(counts: Sequence[int], total: int) -> list[int]:
    """``total`` bank samples split over buckets in proportion to their ``counts`` (largest remainders
    first, ties to the earlier bucket), at least one each.

    Raises:
        UserError: fewer samples than buckets.
    """
    if total < len(counts):
        raise UserError(
            f"bank.num_samples={total} is fewer than the {len(counts)} buckets of the target; raise it"
        )
    spare, whole = total - len(counts), sum(counts)
    shares = [1 + spare * n // whole for n in counts]
    order = sorted(range(len(counts)), key=lambda i: (-(spare * counts[i] % whole), i))  # exact remainders
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


class BucketRows:
    """The rows of one set per bucket in one index space: set b holds rows ``starts[b] .. starts[b+1] - 1``.

    A read takes rows of one bucket (a batch is one size); :meth:`bucket_of` says which.
    """

    def __init__(self, parts: Sequence[torch.Tensor | MappedRows]) -> None:
        self.parts = list(parts)
        self.starts = torch.tensor([0, *torch.tensor([len(p) for p in parts]).cumsum(0).tolist()])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((int(self.starts[-1]),))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def bucket_of(self, indices: torch.Tensor) -> int:
        """The bucket all ``indices`` lie in.

        Raises:
            ValueError: they lie in several (a bug: a step's rows come from one bucket).
        """
        found = (torch.searchsorted(self.starts, indices, right=True) - 1).unique()
        if found.numel() != 1:
            raise ValueError(f"rows {indices.tolist()} lie in buckets {found.tolist()}, not in one")
        return int(found)

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        bucket = self.bucket_of(indices)
        return self.parts[bucket][indices - self.starts[bucket]]
