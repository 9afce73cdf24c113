"""Built-in datasets that need no download: scikit-learn's handwritten digits.

The training data (``data.source: digits``), the demo and the FID reference ``--real digits`` all read
them from here.
"""

from __future__ import annotations

import torch

__all__ = ["load_sklearn_digits"]


def load_sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Load scikit-learn's bundled digits data set (1797 images, no download).

    Returns:
        ``images`` float32 ``(1797, 1, 8, 8)`` in ``[0, 1]`` and ``labels`` int64 ``(1797,)`` in ``0..9``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(data.target, dtype=torch.long)
    return images, labels
