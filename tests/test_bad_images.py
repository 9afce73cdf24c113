"""Real datasets hold odd files: each is decoded correctly, or refused in one line that names it
(all of them at once), or skipped with ``data.on_bad_file=skip``; labels never shift."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftune.cli import main
from difftune.config.experiment import load_config
from difftune.data.targets import load_target_images
from difftune.errors import UserError
from difftune.io.images import open_image
from test_training import _image_folder, folder_cfg


def _png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def _bomb() -> bytes:
    """A valid 1x1 PNG whose header claims 50000 x 50000 pixels (2.5e9: a decompression bomb)."""
    data = bytearray(_png_bytes(Image.new("L", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 50000, 50000)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


BAD = {
    "random bytes": lambda: np.random.default_rng(0).integers(0, 255, 300, dtype=np.uint8).tobytes(),
    "zero bytes": lambda: b"",
    "text under .png": lambda: b"this is not an image\n",
    "decompression bomb": _bomb,
}


# ----------------------------------------------------------------------------------- decoding


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(path)  # 32896 / 257 = 128
    assert Image.open(path).mode == "I;16"
    assert np.asarray(open_image(path, "L")).tolist() == [[128] * 4] * 4
    assert np.asarray(open_image(path, "RGB"))[0, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize("kind", ["rgba", "palette", "grey+alpha"])
def test_transparent_pixels_are_composited_over_white(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.png"
    if kind == "rgba":
        image = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
        image.putpixel((1, 0), (0, 0, 255, 255))
        image.save(path)
    elif kind == "palette":
        image = Image.new("P", (2, 1))
        image.putpalette([0, 0, 0, 0, 0, 255])
        image.putpixel((1, 0), 1)
        image.save(path, transparency=0)  # entry 0 (black) is transparent
    else:
        image = Image.new("LA", (2, 1), (0, 0))
        image.putpixel((1, 0), (0, 255))
        image.save(path)
    rgb = np.asarray(open_image(path, "RGB"))
    assert rgb[0, 0].tolist() == [255, 255, 255]  # transparent: white, not the colour under it
    assert rgb[0, 1].tolist() in ([0, 0, 255], [0, 0, 0])  # opaque pixels keep their colour


def test_cmyk_and_grey_convert(tmp_path: Path) -> None:
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # red in CMYK
    red = np.asarray(open_image(tmp_path / "c.jpg", "RGB"))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    Image.new("L", (2, 2), 77).save(tmp_path / "g.png")
    assert np.asarray(open_image(tmp_path / "g.png", "RGB"))[0, 0].tolist() == [77, 77, 77]


# ----------------------------------------------------------------------------------- folders


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_file_is_refused_in_one_line_naming_it(
    kind: str, dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "images"
    _image_folder(root)
    (root / "b" / "bad.png").write_bytes(BAD[kind]())
    cfg_file = tmp_path / "c.yaml"
    folder_cfg(root, tmp_path, dit_dir).save(cfg_file)
    assert main(["train", "--config", str(cfg_file)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("difftune: error:")]
    assert len(err) == 1 and "b/bad.png" in err[0] and "data.on_bad_file=skip" in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_bad_file_and_empty_folder_is_named_at_once(dit_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "images"
    _image_folder(root)
    (root / "a" / "x.png").write_bytes(b"")
    (root / "b" / "y.jpg").write_bytes(b"junk")
    (root / "c_empty").mkdir()
    with pytest.raises(UserError) as err:
        load_target_images(load_config(None, _overrides(root)).data, 8, 1)
    message = str(err.value)
    assert "3 unusable" in message and "a/x.png" in message and "b/y.jpg" in message
    assert "c_empty/ (no images)" in message


def _overrides(root: Path, *extra: str) -> list[str]:
    return [
        "model.pretrained=x/y",
        "data.source=folder",
        f"data.path={root}",
        "objective.bank_share=0",
        *extra,
    ]


def test_skip_leaves_bad_files_and_empty_folders_out_without_shifting_labels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "images"
    values = _image_folder(root)
    (root / "a" / "x.png").write_bytes(b"")
    (root / "0_empty").mkdir()  # sorts first: it must not take label 0
    with caplog.at_level("WARNING"):
        images = load_target_images(load_config(None, _overrides(root, "data.on_bad_file=skip")).data, 8, 1)
    assert images.class_names == ["a", "b"]
    assert images.labels.tolist() == [0, 0, 0, 1, 1, 1]
    expected = torch.tensor([v / 127.5 - 1 for v in values.values()]).view(6, 1, 1, 1).expand(6, 1, 8, 8)
    torch.testing.assert_close(images.images, expected, rtol=0, atol=1e-6)
    assert "skipping unreadable image" in caplog.text and "x.png" in caplog.text
    assert "skipping class folder" in caplog.text and "0_empty" in caplog.text


def test_hidden_folders_are_not_classes_or_images(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _image_folder(root)
    for hidden in (root / ".ipynb_checkpoints", root / "a" / ".ipynb_checkpoints"):
        hidden.mkdir()
        Image.new("L", (8, 8), 3).save(hidden / "0-checkpoint.png")
    images = load_target_images(load_config(None, _overrides(root)).data, 8, 1)
    assert images.class_names == ["a", "b"] and images.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_header_checks_are_remembered_until_a_file_changes(tmp_path: Path, monkeypatch) -> None:
    import difftune.io.images as images

    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(root / name / f"{i}.png")
    memo = tmp_path / "cache" / "image_checks.json"
    cfg = load_config(None, _overrides(root)).data
    opened: list[Path] = []
    real = images.check_image
    monkeypatch.setattr(images, "check_image", lambda p: opened.append(Path(p)) or real(p))

    first = load_target_images(cfg, 8, 1, memo)
    assert len(opened) == 6 and memo.is_file()
    opened.clear()
    again = load_target_images(cfg, 8, 1, memo)
    assert opened == [] and again.identity == first.identity  # nothing opened a second time

    bad = root / "b" / "1.png"
    size = bad.stat().st_size
    before = bad.stat().st_mtime_ns
    bad.write_bytes(b"x" * size)  # same size, new contents and time
    os.utime(bad, ns=(before + 10**9, before + 10**9))  # a second later even where mtime is coarse
    with pytest.raises(UserError, match=r"b/1\.png \(cannot identify"):
        load_target_images(cfg, 8, 1, memo)
    assert opened == [bad]  # only the changed file was read again

    memo.write_text("{torn")
    opened.clear()
    with pytest.raises(UserError, match=r"b/1\.png"):
        load_target_images(cfg, 8, 1, memo)
    assert len(opened) == 6  # a damaged memo is not trusted
