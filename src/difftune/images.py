"""Image files: grids and per-sample PNGs written atomically."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from difftune.atomic import atomic_path


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1) -> torch.Tensor:
    """Tile images (N, C, H, W) in [0, 1] into one (C, H', W') image, ``nrow`` images per row."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = images.new_ones(c, rows * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def to_pil(image: torch.Tensor, upscale: int = 1) -> Image.Image:
    """One image (C, H, W) in [0, 1] -> PIL image (grey for 1 channel), optionally upscaled (nearest)."""
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    pil = Image.fromarray(array)
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
    return pil


def save_png(image: torch.Tensor, path: str | os.PathLike, upscale: int = 1) -> None:
    """Save one image (C, H, W) in [0, 1] as PNG, atomically."""
    with atomic_path(path) as tmp:
        to_pil(image, upscale).save(tmp, format="PNG")


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, upscale: int = 1) -> None:
    """Save images (N, C, H, W) in [0, 1] as one grid PNG."""
    save_png(make_grid(images, nrow), path, upscale)
