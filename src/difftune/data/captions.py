"""Captioned target sets for text-conditional models, and their control images for a ControlNet.

Two layouts, both as the ``datasets`` library and diffusers' training examples use them:

* an image folder with ``metadata.jsonl``: one JSON object per line with ``file_name`` (relative
  to the folder), the caption (``data.caption_column``, default ``text``) and, for a ControlNet with
  precomputed conditions, the control image's file (``data.control_column``);
* a dataset written by ``datasets.Dataset.save_to_disk`` with image and caption columns (and the
  control image's column).

A labelled set (an image folder with a sub-directory per class, or the digits) gets captions from
``data.caption_template`` and its class names.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from difftune.config.data import DataConfig
from difftune.errors import UserError
from difftune.io.images import check_images, image_size, load_cover_image, load_each, load_square_image

METADATA = "metadata.jsonl"


def read_metadata(root: Path, caption_column: str, control_column: str | None) -> list[dict[str, Any]]:
    """The rows of ``root/metadata.jsonl``, each checked for its file, caption and control columns.

    Every file a row names (``file_name``, and the control column's) must lie inside ``root``, and no
    image may be listed twice (it would weigh twice in training).

    Raises:
        UserError: the file is missing, a line is not JSON, a row lacks a column, names a file outside
            ``root``, or lists an image an earlier line lists (each named with its line).
    """
    path = root / METADATA
    if not path.is_file():
        raise UserError(
            f"data.path {str(root)!r} has no {METADATA}; write one JSON line per image with "
            f'"file_name" and "{caption_column}"'
        )
    rows = []
    folder = root.resolve()  # what every listed file must lie inside
    first_line: dict[Path, int] = {}  # each listed image (by its normalised name) -> the line that lists it
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path} line {number} is not JSON ({err.msg}); fix or remove that line"
            ) from None
        needed = ["file_name", caption_column] + ([control_column] if control_column else [])
        missing = [key for key in needed if not isinstance(row, dict) or key not in row]
        if missing:
            raise UserError(f"{path} line {number} has no {missing}; every line needs {needed}")
        image = _listed_file(folder, row["file_name"], f"{path} line {number}", "file_name")
        if control_column:  # a control image may serve many images: it is only kept inside the folder
            _listed_file(folder, row[control_column], f"{path} line {number}", control_column)
        if image in first_line:
            raise UserError(
                f"{path} lists {row['file_name']!r} twice (lines {first_line[image]} and {number}), which "
                "would weigh that image twice; keep one line per image"
            )
        first_line[image] = number
        rows.append(row)
    if not rows:
        raise UserError(f"{path} lists no images")
    return rows


def _listed_file(folder: Path, name: Any, where: str, column: str) -> Path:
    """The file ``name`` (a value of ``column`` at ``where``) inside ``folder``, by its name alone: a name
    may not climb out of the folder, while a link inside it is the user's own choice and is followed.

    Raises:
        UserError: ``name`` is not a file name, or is absolute, or climbs out of ``folder`` with ``..``.
    """
    if not isinstance(name, str) or not name.strip():
        raise UserError(
            f"{where}: {column}={name!r} is not a file name; give the file's path inside {folder}"
        )
    inside = Path(os.path.normpath(name))
    if inside.is_absolute() or inside.parts[0] == "..":
        raise UserError(
            f"{where}: {column}={name!r} lies outside the data folder {folder}; name a file inside it "
            "(copy the file into the folder)"
        )
    return folder / inside


class CaptionedImages:
    """Images with captions and, optionally, control images, loaded lazily by index.

    Attributes:
        captions: one caption per image.
        identity: a string that changes when the images, captions or control images change.
    """

    def __init__(
        self,
        captions: list[str],
        identity: str,
        image: Callable[[int], Image.Image | str | Path],
        control: Callable[[int], Image.Image | str | Path] | None = None,
    ) -> None:
        self.captions = captions
        self.identity = identity
        self._image = image
        self._control = control

    @property
    def has_controls(self) -> bool:
        """The data brings its own control images."""
        return self._control is not None

    def __len__(self) -> int:
        return len(self.captions)

    def images(self, indices: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
        """Images (n, channels, r, r) in [-1, 1]."""
        return self.sized_images(indices, (resolution, resolution), channels)

    def sized_images(self, indices: torch.Tensor, size: tuple[int, int], channels: int) -> torch.Tensor:
        """Images (n, channels, height, width) in [-1, 1], each covering ``size`` = (width, height), centre-cropped."""
        return load_each(lambda i: load_cover_image(self._image(i), size, channels), indices)

    def sizes(self, indices: torch.Tensor) -> list[tuple[int, int]]:
        """(width, height) of the images ``indices`` (a file's from its header)."""
        return [image_size(self._image(i)) for i in indices.tolist()]

    def controls(self, indices: torch.Tensor, resolution: int) -> torch.Tensor:
        """Control images (n, 3, r, r) in [0, 1], resized with the nearest pixel: a segmentation map's
        colours or an edge map's 0/1 stay what they are."""
        if self._control is None:
            raise UserError("this dataset has no control images: set data.control_column or data.annotator")
        control = self._control
        nearest = Image.Resampling.NEAREST
        return (load_each(lambda i: load_square_image(control(i), resolution, 3, nearest), indices) + 1) / 2


def caption_folder(cfg: DataConfig, header_memo: Path | None = None) -> CaptionedImages:
    """The images of ``cfg.path`` listed in its ``metadata.jsonl``, with their captions and controls.

    Raises:
        UserError: a listed file is missing or unreadable (all named).
    """
    root = Path(cfg.path or "")
    if not root.is_dir():
        raise UserError(
            f"data.path {str(root)!r} is not a directory; point it at an image folder with {METADATA}"
        )
    rows = read_metadata(root, cfg.caption_column, cfg.control_column)
    files = [root / row["file_name"] for row in rows]
    controls = [root / row[cfg.control_column] for row in rows] if cfg.control_column else []
    bad = {p: "missing" for p in files + controls if not p.is_file()}
    bad.update(check_images([p for p in files + controls if p.is_file()], header_memo))
    if bad:
        named = "; ".join(f"{p.relative_to(root)} ({why})" for p, why in list(bad.items())[:5])
        raise UserError(
            f"data.path {root}: {len(bad)} unusable image(s) ({named}); fix {METADATA} or the files"
        )
    listing = [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files + controls]
    captions = [str(row[cfg.caption_column]) for row in rows]
    digest = _digest({"files": listing, "captions": captions})
    return CaptionedImages(
        captions,
        f"captions:{root.resolve()}:{digest}",
        lambda i: files[i],
        (lambda i: controls[i]) if controls else None,
    )


def saved_dataset(cfg: DataConfig) -> CaptionedImages:
    """A dataset written by ``datasets.Dataset.save_to_disk`` at ``cfg.path``.

    Raises:
        UserError: ``datasets`` is not installed, the path is not a saved dataset, or a column is missing.
    """
    try:
        import datasets
    except ImportError:
        raise UserError("data.source=hf_dataset needs the datasets library: pip install datasets") from None
    try:
        data = datasets.load_from_disk(str(cfg.path))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(
            f"data.path {cfg.path!r} is not a saved dataset ({str(err).splitlines()[0]}); write it with "
            "Dataset.save_to_disk"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    needed = [cfg.image_column, cfg.caption_column] + ([cfg.control_column] if cfg.control_column else [])
    missing = [c for c in needed if c not in data.column_names]
    if missing:
        raise UserError(
            f"saved dataset {cfg.path!r} has no column(s) {missing}; its columns: {data.column_names}"
        )
    captions = [str(c) for c in data[cfg.caption_column]]
    files = [Path(f["filename"]) for f in data.cache_files]  # the arrow files it was saved as
    identity = f"hf_dataset:{Path(str(cfg.path)).resolve()}:{_digest([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])}"
    control = cfg.control_column
    return CaptionedImages(
        captions,
        identity,
        lambda i: data[i][cfg.image_column],
        (lambda i: data[i][control]) if control else None,
    )


def template_captions(class_names: list[str], labels: torch.Tensor, template: str) -> list[str]:
    """Captions of a labelled set: ``template`` with each image's class name."""
    return [template.format(class_names[int(label)]) for label in labels]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
