"""Target data: lazy loading, sharded and resumable encoding, the flip augmentation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from difftune.backbones import LatentCodec
from difftune.config.experiment import DataConfig
from difftune.data.target_cache import encode_and_cache
from difftune.data.targets import load_target_images
from difftune.io.store import LatentStore


@pytest.fixture
def digits():
    return load_target_images(DataConfig(source="digits", classes=[5, 6, 7, 8, 9], per_class=4), 8, 1)


def test_pixel_cache_holds_images_and_mirrors(digits, tmp_path: Path) -> None:
    cache = encode_and_cache(digits, LatentCodec(None), tmp_path / "c", "pixel", hflip=True, batch_size=32)
    images = digits.images
    assert cache["samples"].shape == (40, 1, 8, 8)
    assert torch.equal(cache["samples"][:20], images)
    assert torch.equal(cache["samples"][20:], images.flip(-1))
    assert torch.equal(cache["labels"], torch.cat([digits.labels, digits.labels]))
    assert not cache["std"].any()


def test_encoding_resumes_after_a_crash_and_equals_a_full_run(digits, tmp_path: Path, monkeypatch) -> None:
    full = encode_and_cache(digits, LatentCodec(None), tmp_path / "full", "pixel", batch_size=3, shard_size=8)
    original = LatentStore.write_shard
    written = []

    def crash_after_first(self, index, tensors):
        if written:
            raise KeyboardInterrupt("simulated crash")
        written.append(index)
        original(self, index, tensors)

    monkeypatch.setattr(LatentStore, "write_shard", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        encode_and_cache(digits, LatentCodec(None), tmp_path / "resumed", "pixel", batch_size=3, shard_size=8)
    monkeypatch.setattr(LatentStore, "write_shard", original)
    assert LatentStore(tmp_path / "resumed").missing_shards() == [1, 2]
    encoded = []
    monkeypatch.setattr(
        digits, "loader", lambda idx, load=digits.loader: encoded.append(len(idx)) or load(idx)
    )
    resumed = encode_and_cache(
        digits, LatentCodec(None), tmp_path / "resumed", "pixel", batch_size=3, shard_size=8
    )
    assert sum(encoded) == 12  # only shards 1 and 2 (samples 8..19) were encoded again
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_stale_cache_of_other_data_is_replaced(digits, tmp_path: Path) -> None:
    encode_and_cache(digits, LatentCodec(None), tmp_path / "c", "pixel")
    other = load_target_images(DataConfig(source="digits", classes=[0, 1], per_class=3), 8, 1)
    cache = encode_and_cache(other, LatentCodec(None), tmp_path / "c", "pixel")
    assert torch.equal(cache["samples"], other.images)


def test_folder_identity_follows_the_files(tmp_path: Path) -> None:
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / cls / f"{i}.png")
    cfg = DataConfig(source="folder", path=str(tmp_path))
    first = load_target_images(cfg, 8, 3).identity
    assert load_target_images(cfg, 8, 3).identity == first
    assert load_target_images(cfg, 4, 3).identity != first  # another resolution is other data
    image = tmp_path / "a" / "0.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    touched = load_target_images(cfg, 8, 3).identity
    assert touched != first
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "2.png")
    assert load_target_images(cfg, 8, 3).identity not in (first, touched)
