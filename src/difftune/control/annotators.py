"""Annotators: turn RGB images into control images, the way ControlNet's training data was made.

Condition fidelity re-extracts the control from generated images with the same annotator that made the
input control, so the two can be compared pixel for pixel. OpenCV is imported when an annotator runs,
not when this module is imported, so ``difftune --help`` works without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from difftune.errors import UserError
from difftune.plugins import import_object

__all__ = ["ANNOTATORS", "Annotator", "CannyAnnotator", "build_annotator", "to_uint8_hwc"]


class Annotator(Protocol):
    """Maps images ``(N, C, H, W)`` in [-1, 1] to control images ``(N, 3, H, W)`` in [0, 1]."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def record(self) -> dict[str, Any]: ...


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Images ``(N, 1 or 3, H, W)`` in [-1, 1] as uint8 ``(N, H, W, 3)``, rounded as a PIL save would.

    Each value becomes ``round((x + 1) * 127.5)`` clipped to 0..255; grayscale is replicated to RGB.

    Raises:
        UserError: the tensor is not 4-D with 1 or 3 channels.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"an annotator takes images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    pixels = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()


class CannyAnnotator:
    """OpenCV's Canny edge detector with ControlNet's thresholds (low 100, high 200).

    Like ControlNet's ``CannyDetector``, ``cv2.Canny`` runs on the RGB image itself (OpenCV takes the
    strongest gradient over the channels); the binary edge map is replicated on 3 channels, as
    ControlNet's training data stores it.
    """

    name = "canny"

    def __init__(self, low: int = 100, high: int = 200) -> None:
        if not 0 <= low <= high:
            raise UserError(f"canny thresholds must satisfy 0 <= low <= high, got low={low} high={high}")
        self.low, self.high = int(low), int(high)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Edge maps ``(N, 3, H, W)`` float32 in {0, 1} of images ``(N, 1 or 3, H, W)`` in [-1, 1].

        The result is on the device of ``images``.
        """
        import cv2

        pixels = to_uint8_hwc(images)
        edges = np.stack([cv2.Canny(image, self.low, self.high) for image in pixels])
        maps = torch.from_numpy(edges > 0).to(torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
        return maps.to(images.device)

    def record(self) -> dict[str, Any]:
        """What identifies this annotator's output (for cache keys and logs)."""
        return {"name": self.name, "low": self.low, "high": self.high}

    def __repr__(self) -> str:
        return f"CannyAnnotator(low={self.low}, high={self.high})"


ANNOTATORS: dict[str, Callable[..., Annotator]] = {"canny": CannyAnnotator}


def build_annotator(name: str, **kwargs: Any) -> Annotator:
    """The annotator registered as ``name``, built with ``kwargs`` (e.g. ``low=50`` for Canny).

    Raises:
        UserError: ``name`` is not in :data:`ANNOTATORS` (the message lists the valid names), or
            ``kwargs`` are not its options.
    """
    if ":" in name:
        return NamedAnnotator(name, import_object(name, "annotator"))
    if name not in ANNOTATORS:
        raise UserError(
            f"unknown annotator {name!r}; valid: {', '.join(sorted(ANNOTATORS))} or 'package.module:function'"
        )
    try:
        return ANNOTATORS[name](**kwargs)
    except TypeError as err:
        raise UserError(f"annotator {name!r}: {err}") from err


class NamedAnnotator:
    """A user's annotator function (``"package.module:function"``): images (N, C, H, W) in [-1, 1] ->
    control images (N, 3, H, W) in [0, 1]; recorded by its name."""

    def __init__(self, name: str, function: Any) -> None:
        if not callable(function):
            raise UserError(f"annotator {name!r} is not callable")
        self.name = name
        self.function = function

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.function(images)

    def record(self) -> dict[str, Any]:
        return {"name": self.name}
