"""Image files, read and written in one place.

Reading: the accepted formats (:data:`IMAGE_EXTENSIONS`, the same for training data and evaluation),
listing them under a folder (:func:`image_files`, :func:`list_images`) and decoding one file
(:func:`open_image`; a corrupt file is a one-line ``ValueError`` naming it). Writing: grids and
per-sample PNGs, and image arrays as ``.npz``, all atomically (:mod:`difftune.io.atomic`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from difftune.errors import UserError
from difftune.io.atomic import atomic_open, atomic_path, atomic_write_json
from difftune.io.image_formats import IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------- reading
def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files (by :data:`IMAGE_EXTENSIONS`, any case) under ``folder``, recursively, sorted by path.

    Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``, ...) are not images of the set.
    """
    root = Path(folder)
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """:func:`image_files` of ``folder``, which must exist and hold at least one image.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: ``folder`` is not a directory or holds no image.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    if not root.is_dir():
        raise UserError(f"{str(folder)!r} is not a directory")
    paths = image_files(root)
    if not paths:
        raise UserError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(folder)!r} (searched recursively)"
        )
    return paths


def open_image(path: str | os.PathLike[str], mode: str = "RGB") -> Image.Image:
    """Decode one image file completely, converted to PIL ``mode`` (``"RGB"`` or ``"L"``).

    Conversions that PIL's own ``convert`` gets wrong are done here: 16-bit grey is scaled to 8 bits
    (``convert`` clips it to white), and transparent pixels (alpha, or a palette's transparent
    entry) are composited over white (``convert`` drops the alpha and shows whatever colour lies
    under it). CMYK and grey images convert to RGB as usual.

    Raises:
        ValueError: the file cannot be decoded, or is a decompression bomb; one line naming the file.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return _convert(img, mode)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot read image {str(path)!r} ({reason}); remove or replace the file") from None


def load_square_image(
    source: str | os.PathLike[str] | Image.Image,
    resolution: int,
    channels: int,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> torch.Tensor:
    """An image (a file, or a decoded PIL image), resized (shorter side, with ``resample``) and
    centre-cropped to ``resolution``: ``(channels, r, r)`` in [-1, 1].

    Raises:
        ValueError: the file cannot be decoded (the message names it).
    """
    return load_cover_image(source, (resolution, resolution), channels, resample)


def load_cover_image(
    source: str | os.PathLike[str] | Image.Image,
    size: tuple[int, int],
    channels: int,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> torch.Tensor:
    """An image resized (with ``resample``, keeping its aspect ratio) to cover ``size`` = (width, height)
    and centre-cropped to it, never stretched: ``(channels, height, width)`` in [-1, 1].

    Raises:
        ValueError: the file cannot be decoded (the message names it).
    """
    width, height = size
    mode = "RGB" if channels == 3 else "L"
    img = _convert(source, mode) if isinstance(source, Image.Image) else open_image(source, mode)
    resized, (left, top) = cover_crop(img.size, size)
    img = img.resize(resized, resample)
    img = img.crop((left, top, left + width, top + height))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def cover_crop(original: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where :func:`load_cover_image` crops an image of ``original`` = (width, height) to ``size``:
    ``((resized width, height), (left, top))``, the crop's offsets in the resized image's pixels."""
    (w, h), (width, height) = original, size
    scale = max(width / w, height / h)
    resized = (max(width, round(w * scale)), max(height, round(h * scale)))
    return resized, ((resized[0] - width) // 2, (resized[1] - height) // 2)


def image_size(source: str | os.PathLike[str] | Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an image: a file's from its header alone (nothing is decoded).

    Raises:
        ValueError: the file is not an image (the message names it).
    """
    if isinstance(source, Image.Image):
        return source.size
    try:
        with Image.open(source) as img:
            return img.size
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"cannot read image {str(source)!r} ({err}); remove or replace the file") from None


def load_each(load_one: Callable[[int], torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """``torch.stack`` of ``load_one(i)`` for every index, decoded on a few threads (PIL decodes
    outside the GIL for the most part, so threads give a real speed-up)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return torch.stack(list(pool.map(load_one, indices.tolist())))


def check_image(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be used as an image (from its header, without decoding it), or ``None``."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    if width * height > (Image.MAX_IMAGE_PIXELS or 0) > 0:
        return f"{width}x{height} pixels, more than the {Image.MAX_IMAGE_PIXELS} that PIL decodes safely"
    return None


def check_images(paths: Sequence[Path], memo: Path | None = None) -> dict[Path, str]:
    """:func:`check_image` of every file in ``paths``: ``{path: why}`` for the unusable ones.

    With ``memo``, the verdicts are also saved there (JSON, keyed by absolute path, with each file's
    size and modification time), and a file whose size and time are unchanged since the last call
    is not opened again, so a large folder's headers are read once, not at every run's start.
    """
    known: dict = {}
    if memo is not None and memo.is_file():
        try:
            saved = json.loads(memo.read_text())
            known = saved["files"] if saved.get("max_pixels") == Image.MAX_IMAGE_PIXELS else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            known = {}  # a torn or foreign file: check everything again
    verdicts: dict[str, list] = {}
    unusable: dict[Path, str] = {}
    for path in paths:
        stat = path.stat()
        key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
        entry = known.get(key)
        fresh = isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp
        verdicts[key] = entry if fresh else [*stamp, check_image(path)]
        if verdicts[key][2] is not None:
            unusable[path] = verdicts[key][2]
    if memo is not None and verdicts != known:
        atomic_write_json(memo, {"max_pixels": Image.MAX_IMAGE_PIXELS, "files": verdicts}, indent=0)
    return unusable


def _convert(img: Image.Image, mode: str) -> Image.Image:
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grey: 0..65535 to 0..255
        array = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(mode)


def load_image(path: str | os.PathLike[str], resize: int | None = None) -> torch.Tensor:
    """One image file as uint8 RGB ``(3, H, W)``, optionally resized to ``resize x resize`` (PIL bicubic).

    Raises:
        ValueError: the file cannot be decoded (the message names it).
    """
    rgb = open_image(path, "RGB")
    if resize is not None and rgb.size != (resize, resize):
        rgb = rgb.resize((resize, resize), Image.BICUBIC)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def to_uint8_rgb(images: torch.Tensor, resize: int | None = None) -> torch.Tensor:
    """Float images ``(B, C, H, W)`` in ``[0, 1]`` -> uint8 RGB ``(B, 3, H', W')``, as a PNG round trip does.

    Grey images are repeated over three channels; ``resize`` resizes as :func:`load_image` does.
    """
    x = (images.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if resize is not None and tuple(x.shape[-2:]) != (resize, resize):
        pils = [
            Image.fromarray(im.permute(1, 2, 0).numpy()).resize((resize, resize), Image.BICUBIC) for im in x
        ]
        x = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pils])
    return x.contiguous()


# ---------------------------------------------------------------------------------------------- writing
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


def save_grid(
    images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, upscale: int = 1
) -> None:
    """Save images (N, C, H, W) in [0, 1] as one grid PNG."""
    save_png(make_grid(images, nrow), path, upscale)


def export_npz(images: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write uint8 images ``(N, H, W, 3)`` as guided-diffusion's evaluator reads them (key ``arr_0``), atomically."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    with atomic_open(path) as f:
        np.savez(f, arr_0=images)
