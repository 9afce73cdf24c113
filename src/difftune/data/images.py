"""A target image set before encoding: labels, class names, captions and a lazy image loader."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from difftune.data.captions import template_captions


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
    """

    labels: torch.Tensor
    class_names: list[str]
    identity: str
    loader: Callable[[torch.Tensor], torch.Tensor]
    captions: list[str] | None = None
    controls: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    sized: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None = None
    sizes: Callable[[], list[tuple[int, int]]] | None = None

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

    def bucket(self, indices: torch.Tensor, size: tuple[int, int], settings: str) -> TargetImages:
        """The images ``indices`` at ``size`` = (width, height) (``data.buckets``), as a set of their own
        whose identity names them, the size and the bucket ``settings``."""
        if self.sized is None:
            raise ValueError("this set's images have no sizes of their own")
        sized, chosen = self.sized, indices.tolist()
        digest = hashlib.sha256(json.dumps(chosen).encode()).hexdigest()[:16]
        return TargetImages(
            self.labels[indices],
            self.class_names,
            f"{self.identity}:bucket:{size[0]}x{size[1]}:{settings}:{digest}",
            lambda idx: sized(indices[idx], size),
            None if self.captions is None else [self.captions[i] for i in chosen],
        )
