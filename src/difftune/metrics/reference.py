"""Built-in reference datasets for FID (``--real digits``), as uint8 RGB images."""

from __future__ import annotations

from pathlib import Path

import torch

from difftune.data.builtin import load_sklearn_digits
from difftune.errors import UserError
from difftune.io.images import to_uint8_rgb

__all__ = ["reference_dataset"]


def reference_dataset(spec: str) -> tuple[str, torch.Tensor] | None:
    """The built-in dataset that ``--real`` names, as (canonical name, uint8 RGB images ``(N, 3, H, W)``).

    ``digits`` is scikit-learn's handwritten digits (1797 images of 8x8, shipped with scikit-learn);
    ``digits:5,6,7,8,9`` keeps those classes. Returns ``None`` when ``spec`` names no dataset or is an
    existing path (a folder called ``digits`` is a folder).

    Raises:
        ValueError: the class list is not digits 0-9.
    """
    name, colon, classes_text = spec.partition(":")
    if name != "digits" or Path(spec).exists():
        return None
    images, labels = load_sklearn_digits()
    if colon:
        parts = [c.strip() for c in classes_text.split(",")]
        if not all(c.isdigit() and len(c) == 1 for c in parts):
            raise UserError(
                f"--real {spec!r}: give digit classes 0-9, comma-separated, e.g. digits:5,6,7,8,9"
            )
        classes = sorted({int(c) for c in parts})
        images = images[torch.isin(labels, torch.tensor(classes))]
        name = "digits:" + ",".join(map(str, classes))
    return name, to_uint8_rgb(images)
