"""A target image set before encoding: labels, class names, captions and a lazy image loader."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from difftune.data.captions import template_captions
from difftune.io.images import cover_crop


@dataclass
class TargetImages:
    """A labelled image set, loaded lazily in chunks (a real dataset does not fit in memory as floats).

    Attributes:
        labels: (N,) int64 in 0..K-1 (all 0 for a captioned set).
        class_names: K names.
        identity: a string that changes when the data changes (for the cache).
        loader: ``indices (n,) -> images (n, C, H, W)`` float32 in [-1, 1].
        captions: the images' own captions (a captioned set), or ``None``.
        controls: ``(indices, resolution) -> control images (n, 3, r, r)`` in [0, 1], when the data
            brings its own.
        sized: ``(indices, (width, height)) -> images (n, C, height, width)``, each resized to cover that
            size and centre-cropped, for sets whose images have sizes of their own (``data.buckets``).
        sizes: ``() -> [(width, height)]`` of every image, from the files' headers (with ``sized``).
        cover: the size (width, height) every image of a bucket (:meth:`bucket`) is resized to cover and
            centre-cropped to; ``None``: the images load at the square training size.
    """

    labels: torch.Tensor
    class_names: list[str]
    identity: str
    loader: Callable[[torch.Tensor], torch.Tensor]
    captions: list[str] | None = None
    controls: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    sized: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None = None
    sizes: Callable[[], list[tuple[int, int]]] | None = None
    cover: tuple[int, int] | None = None
    _sizes: list[tuple[int, int]] | None = field(default=None, init=False, repr=False)

    def caption_list(self, template: str) -> list[str]:
        """The images' captions: their own, or ``template`` filled with each image's class name."""
        if self.captions is not None:
            return self.captions
        return template_captions(self.class_names, self.labels, template)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def load(self, indices: torch.Tensor) -> torch.Tensor:
        """Images (n, C, H, W) in [-1, 1] for ``indices``."""
        return self.loader(indices)

    @property
    def images(self) -> torch.Tensor:
        """All images at once (N, C, H, W); for small sets."""
        return self.load(torch.arange(len(self)))

    def image_sizes(self) -> list[tuple[int, int]]:
        """``sizes()``, read once (files' headers, or a dataset's images, are read on the first call only).

        Raises:
            ValueError: the set's images have no sizes of their own.
        """
        if self.sizes is None:
            raise ValueError("this set's images have no sizes of their own")
        if self._sizes is None:
            self._sizes = self.sizes()
        return self._sizes

    def bucket(self, indices: torch.Tensor, size: tuple[int, int], settings: str) -> TargetImages:
        """The images ``indices`` at ``size`` = (width, height) (``data.buckets``), as a set of their own
        whose identity names them, the size and the bucket ``settings``."""
        if self.sized is None:
            raise ValueError("this set's images have no sizes of their own")
        sized, chosen = self.sized, indices.tolist()
        sizes = None if self.sizes is None else lambda: [self.image_sizes()[i] for i in chosen]
        digest = hashlib.sha256(json.dumps(chosen).encode()).hexdigest()[:16]
        return TargetImages(
            self.labels[indices],
            self.class_names,
            f"{self.identity}:bucket:{size[0]}x{size[1]}:{settings}:{digest}",
            lambda idx: sized(indices[idx], size),
            None if self.captions is None else [self.captions[i] for i in chosen],
            sizes=sizes,
            cover=size,
        )

    def crops(self, indices: torch.Tensor, flipped: bool) -> torch.Tensor:
        """(n, 4) int64 of a bucket's images ``indices``: each one's original (height, width) and the
        (top, left) of its centre crop in the cover-resized image's pixels (:func:`~difftune.io.images.cover_crop`);
        ``flipped``: of its mirror, whose crop's left is the resized width minus the crop's right edge.

        Raises:
            ValueError: the set is not a bucket of images with sizes of their own.
        """
        if self.cover is None:
            raise ValueError("only a bucket's images (TargetImages.bucket) have crops")
        every, rows = self.image_sizes(), []
        for i in indices.tolist():
            (w, h), ((resized_w, _), (left, top)) = every[i], cover_crop(every[i], self.cover)
            rows.append([h, w, top, resized_w - self.cover[0] - left if flipped else left])
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 4)
