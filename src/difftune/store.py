"""A directory of safetensors shards with a JSON manifest: the knowledge bank and the target cache.

Also where difftune caches things between runs (:func:`user_cache_dir`) and what identifies a folder of
files in a cache key (:func:`folder_identity`).

Layout::

    manifest.json                 what the samples are (source model, settings, shape, dtype, ...)
    shard-00000.safetensors       tensors with a common first dimension: samples, labels, seeds, ...
    shard-00001.safetensors

Every file is written to a temporary name and renamed, so an interrupted writer never leaves a
half-written shard: a shard that exists is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from difftune.atomic import atomic_path, atomic_write_json
from difftune.errors import UserError

MANIFEST = "manifest.json"


def user_cache_dir() -> Path:
    """difftune's cache directory: ``$XDG_CACHE_HOME/difftune``, else ``~/.cache/difftune``."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "difftune"


def folder_identity(root: str | os.PathLike[str], paths: Sequence[Path]) -> list[list[str | int]]:
    """``[relative path, size, modification time]`` of each file in ``paths`` under ``root``: a cache key
    part that changes when a file is added, removed, replaced or touched."""
    files = []
    for path in paths:
        stat = path.stat()
        files.append([path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    return files


class LatentStore:
    """Sharded tensors + manifest in one directory.

    Args:
        root: the directory (created by :meth:`create`).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @classmethod
    def create(
        cls, root: str | os.PathLike, manifest: dict[str, Any], informational: tuple[str, ...] = ()
    ) -> LatentStore:
        """Create the store, or reopen it if its manifest equals ``manifest`` (to resume).

        Keys in ``informational`` (e.g. where the model was loaded from) may differ on reopening.

        Raises:
            ValueError: the directory holds a store made with a different manifest.
        """
        store = cls(root)
        store.root.mkdir(parents=True, exist_ok=True)
        path = store.root / MANIFEST
        if path.is_file():
            old = store.manifest
            keys = (set(old) | set(manifest)) - set(informational)
            diff = sorted(k for k in keys if old.get(k) != manifest.get(k))
            if diff:
                key = diff[0]
                raise UserError(
                    f"{store.root} already holds samples made with other settings ({key}: "
                    f"{old.get(key)!r} there vs {manifest.get(key)!r} now); use another path or delete it"
                )
        else:
            atomic_write_json(path, manifest, sort_keys=True)
        return store

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest dict.

        Raises:
            FileNotFoundError: no manifest (not a store).
        """
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not a difftune store: {MANIFEST} is missing")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is corrupt ({err}); delete the directory and regenerate it") from None

    def shard_path(self, index: int) -> Path:
        """Path of shard ``index``."""
        return self.root / f"shard-{index:05d}.safetensors"

    def has_shard(self, index: int) -> bool:
        """True when shard ``index`` was completely written."""
        return self.shard_path(index).is_file()

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write one shard atomically; all tensors share their first dimension."""
        sizes = {t.shape[0] for t in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"shard tensors must share their first dimension, got {sizes}")
        with atomic_path(self.shard_path(index)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))

    def clear(self) -> None:
        """Delete the store's own files (manifest, shards, their temporaries); anything else stays."""
        for path in self.root.glob("shard-*.safetensors*"):
            path.unlink(missing_ok=True)
        (self.root / MANIFEST).unlink(missing_ok=True)

    def missing_shards(self) -> list[int]:
        """Indices of shards named by the manifest's ``num_shards`` that are not written yet."""
        return [i for i in range(int(self.manifest["num_shards"])) if not self.has_shard(i)]

    def load(self) -> dict[str, torch.Tensor]:
        """All shards concatenated, in shard order.

        Raises:
            ValueError: shards are missing or unreadable (the message says how to fix it).
        """
        missing = self.missing_shards()
        if missing:
            raise UserError(
                f"{self.root} is incomplete: {len(missing)} of {self.manifest['num_shards']} shards missing "
                f"(first: {missing[0]}); run the same generation command again to finish it"
            )
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(int(self.manifest["num_shards"])):
            try:
                shard = load_file(str(self.shard_path(i)))
            except (SafetensorError, OSError) as err:
                raise UserError(
                    f"{self.shard_path(i)} is corrupt ({err}); delete it and rerun generation"
                ) from None
            for key, value in shard.items():
                parts.setdefault(key, []).append(value)
        return {key: torch.cat(values) for key, values in parts.items()}
