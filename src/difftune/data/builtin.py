"""Built-in datasets that need no download.

* scikit-learn's handwritten digits: the training data ``data.source: digits``, the demo and the FID
  reference ``--real digits`` read them from here;
* patches of the photographs that ship inside scikit-image and scikit-learn
  (``data.source: photo_patches``): the source domain of the second test bed, larger and more
  diverse than five digit classes.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from PIL import Image

from difftune.errors import UserError

__all__ = ["PHOTOS", "built_in_class_count", "load_photo_patches", "load_sklearn_digits"]

# (package, file) of every photograph used: natural scenes, objects, textures, microscopy and
# astronomy; printed text, drawings and synthetic test patterns are left out so that nothing in the
# source resembles handwriting.
PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/brick.png"),
    ("skimage", "data/camera.png"),
    ("skimage", "data/cell.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/coins.png"),
    ("skimage", "data/grass.png"),
    ("skimage", "data/gravel.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/moon.png"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/rocket.jpg"),
    ("sklearn.datasets", "images/china.jpg"),
    ("sklearn.datasets", "images/flower.jpg"),
)
PATCH_SCALES = (24, 48, 96)  # each photo's shorter side before patches are cut: parts, objects, scenes


def built_in_class_count(source: str) -> int:
    """Classes of a built-in set: 10 digits, or one per photo of :data:`PHOTOS`."""
    return 10 if source == "digits" else len(PHOTOS)


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


def _photo(package: str, name: str) -> Image.Image:
    try:
        path = resources.files(package).joinpath(name)
        with path.open("rb") as f:
            return Image.open(f).convert("L")
    except ModuleNotFoundError as e:
        raise UserError(
            f"photo patches need the {package.split('.')[0]} package: pip install scikit-image scikit-learn"
        ) from e
    except FileNotFoundError as e:
        raise UserError(
            f"{package} has no bundled {name}: reinstall it (pip install --force-reinstall)"
        ) from e


def load_photo_patches(
    size: int = 8, per_photo: int = 1200, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grayscale ``size`` x ``size`` patches of the bundled photographs (:data:`PHOTOS`), no download.

    Each photo is shrunk so that its shorter side is each of :data:`PATCH_SCALES` in turn and an equal
    share of its ``per_photo`` patches is cut at random positions of each (drawn with ``seed``), so the
    patches range from object parts to whole scenes.

    Returns:
        ``images`` float32 ``(len(PHOTOS) * per_photo, 1, size, size)`` in ``[0, 1]`` and ``labels``
        int64, the photo's index in :data:`PHOTOS`.
    """
    if per_photo < len(PATCH_SCALES):
        raise UserError(f"per_photo={per_photo}: take at least {len(PATCH_SCALES)} patches per photo")
    g = torch.Generator().manual_seed(seed)
    shares = [
        per_photo // len(PATCH_SCALES) + (i < per_photo % len(PATCH_SCALES)) for i in range(len(PATCH_SCALES))
    ]
    images, labels = [], []
    for label, (package, name) in enumerate(PHOTOS):
        photo = _photo(package, name)
        for shorter, count in zip(PATCH_SCALES, shares, strict=True):
            scale = max(shorter, size) / min(photo.size)
            w, h = (max(size, round(side * scale)) for side in photo.size)
            pixels = torch.from_numpy(
                np.asarray(photo.resize((w, h), Image.Resampling.LANCZOS), dtype=np.float32)
            )
            ys = torch.randint(0, h - size + 1, (count,), generator=g)
            xs = torch.randint(0, w - size + 1, (count,), generator=g)
            rows = (ys[:, None] + torch.arange(size))[:, :, None]
            cols = (xs[:, None] + torch.arange(size))[:, None, :]
            images.append(pixels[rows, cols] / 255.0)
            labels.append(torch.full((count,), label, dtype=torch.long))
    return torch.cat(images).unsqueeze(1), torch.cat(labels)
