"""difftune.io.images: training data and evaluation accept the same image files and decode them alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftune.config.experiment import DataConfig
from difftune.data.targets import load_target_images
from difftune.io.images import IMAGE_EXTENSIONS, list_images, load_image, open_image


def _one_file_per_format(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    paths = []
    for i, ext in enumerate(IMAGE_EXTENSIONS):
        path = folder / f"{i}{ext.upper() if i % 2 else ext}"  # the extension's case does not matter
        Image.fromarray(pixels).save(path, format={".jpg": "JPEG", ".tif": "TIFF"}.get(ext.lower()))
        paths.append(path)
    (folder / "notes.txt").write_text("not an image")
    return paths


def test_training_and_evaluation_accept_the_same_formats(tmp_path: Path) -> None:
    assert {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"} == set(IMAGE_EXTENSIONS)
    written = _one_file_per_format(tmp_path / "data" / "class0")
    assert list_images(tmp_path / "data") == sorted(written)  # what `eval fid` scores
    target = load_target_images(DataConfig(source="folder", path=str(tmp_path / "data")), 8, 3)  # what trains
    assert len(target) == len(IMAGE_EXTENSIONS)
    assert target.images.shape == (len(IMAGE_EXTENSIONS), 3, 8, 8)
    for path in written:
        assert load_image(path).shape == (3, 8, 8)


def test_empty_folder_names_the_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images \(\.png, .*\.tiff\)"):
        list_images(tmp_path)


@pytest.mark.parametrize("name", ["broken.png", "broken.webp"])
def test_corrupt_file_is_a_one_line_error_naming_it(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage\nmore garbage")
    for decode in (lambda: open_image(path), lambda: load_image(path)):
        with pytest.raises(ValueError, match=rf"cannot read image .*{name}") as info:
            decode()
        assert "\n" not in str(info.value)


def test_grey_decoding_matches_rgb(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint8)).save(path)
    assert open_image(path, "L").mode == "L"
    assert torch.equal(load_image(path), torch.full((3, 4, 4), 200, dtype=torch.uint8))
