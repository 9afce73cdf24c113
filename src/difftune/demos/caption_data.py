"""The text-to-image test bed's data: the digits split once into the source model's, the target pool and
the held-out ones; the captioned source folder (digits and photo patches) and the rotated target pool."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difftune.data.builtin import PHOTOS, load_photo_patches, load_sklearn_digits

INSTANCE = "sks digit"  # the new instance's phrase in the target captions
CLASS_WORD = "digit"  # what class_swap puts in its place: the prompts the source model was trained on
TARGET_CAPTION = INSTANCE + " {}"
SOURCE_CAPTION = CLASS_WORD + " {}"
PHOTO_CAPTION = "photo of {}"
SPLIT_SEED = 1234  # the fixed split of the digits into source / target pool / evaluation
SPLIT = (0.5, 0.25)  # shares of the source and the target pool; the rest is held out for evaluation


@dataclass(frozen=True)
class DigitSplit:
    """The digits (in [0, 1]) split once for every seed: the source's, the target pool, the held-out ones."""

    images: torch.Tensor  # (N, 1, 8, 8)
    labels: torch.Tensor  # (N,)
    source: torch.Tensor  # indices
    pool: torch.Tensor
    held_out: torch.Tensor

    @classmethod
    def load(cls) -> DigitSplit:
        images, labels = load_sklearn_digits()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
        a, b = (round(share * len(labels)) for share in SPLIT)
        return cls(images, labels, order[:a], order[a : a + b], order[a + b :])


def rotated(images: torch.Tensor) -> torch.Tensor:
    """The target domain: digits turned a quarter anticlockwise."""
    return torch.rot90(images, 1, dims=(-2, -1))


def _write_png(image: torch.Tensor, path: Path) -> None:
    pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(np.ascontiguousarray(pixels), mode="L").save(path)


def photo_name(index: int) -> str:
    """The caption word of bundled photo ``index`` ("hubble deep field" for ``hubble_deep_field.jpg``)."""
    return Path(PHOTOS[index][1]).stem.replace("_", " ")


def write_source_data(root: Path, split: DigitSplit, patches_per_photo: int, seed: int) -> Path:
    """The source model's captioned images (a ``captions`` folder), written once."""
    folder = root / "source_data"
    if (folder / "metadata.jsonl").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in split.source.tolist():
        name = f"images/digit{i:04d}.png"
        _write_png(split.images[i], tmp / name)
        rows.append({"file_name": name, "text": SOURCE_CAPTION.format(int(split.labels[i]))})
    patches, photos = load_photo_patches(per_photo=patches_per_photo, seed=seed)
    for k, (patch, photo) in enumerate(zip(patches, photos.tolist(), strict=True)):
        name = f"images/patch{k:05d}.png"
        _write_png(patch, tmp / name)
        rows.append({"file_name": name, "text": PHOTO_CAPTION.format(photo_name(photo))})
    (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(folder)
    return folder


def write_target_pool(root: Path, split: DigitSplit) -> Path:
    """The rotated digits of the target pool, one folder per digit (each seed takes its few)."""
    folder = root / "target_pool"
    if folder.is_dir():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    for i in split.pool.tolist():
        label = int(split.labels[i])
        (tmp / str(label)).mkdir(parents=True, exist_ok=True)
        _write_png(rotated(split.images[i]), tmp / str(label) / f"{i:04d}.png")
    tmp.rename(folder)
    return folder
