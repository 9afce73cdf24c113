"""A directory of safetensors shards with a JSON manifest: the knowledge bank and the target cache.

Also where difftune caches things between runs (:func:`user_cache_dir`) and what identifies a folder of
files in a cache key (:func:`folder_identity`).

Layout::

    manifest.json                 what the samples are (source model, settings, shape, dtype, ...)
    shard-00000.safetensors       tensors with a common first dimension: samples, labels, seeds, ...
    shard-00001.safetensors

Every file is written to a temporary name and renamed, so an interrupted writer never leaves a
half-written shard; a shard damaged afterwards (a truncated copy, a full disk) is found by its
safetensors header (:meth:`LatentStore.damaged_shards`) and written again on resuming.

The manifest's fields are checked in one place, :func:`check_manifest`, whenever it is read.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from difftune.errors import UserError
from difftune.io.atomic import atomic_path, atomic_write_json

MANIFEST = "manifest.json"

logger = logging.getLogger(__name__)


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


# field -> (test of its value, what the value must be); a field that a manifest lacks is checked only
# where it is listed in REQUIRED
_FieldRule = tuple[Callable[[Any], bool], str]
_COMMON: dict[str, _FieldRule] = {
    "kind": (lambda v: v in ("bank", "target"), "'bank' or 'target'"),
    "format": (lambda v: _whole(v, 1), "a whole number > 0"),
    "num_samples": (lambda v: _whole(v, 1), "a whole number > 0"),  # difftune stores no empty set
    "shard_size": (lambda v: _whole(v, 1), "a whole number > 0"),
    "num_shards": (lambda v: _whole(v, 1), "a whole number > 0"),
}
FIELDS: dict[str, dict[str, _FieldRule]] = {
    "bank": {
        **_COMMON,
        "source": (_text, "a non-empty string"),
        "source_fingerprint": (_text, "a non-empty string"),
        "vae": (lambda v: v is None or _text(v), "a string or null"),
        "space": (lambda v: v in ("pixel", "latent"), "'pixel' or 'latent'"),
        "shape": (
            lambda v: isinstance(v, list) and bool(v) and all(_whole(d, 1) for d in v),
            "a list of sizes > 0",
        ),
        "dtype": (lambda v: v == "float32", "'float32'"),
        "scheduler": (_text, "a scheduler's class name"),
        "noise_schedule": (lambda v: isinstance(v, dict), "an object (a scheduler config)"),
        "num_inference_steps": (lambda v: _whole(v, 1), "a whole number > 0"),
        "guidance_scale": (
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            "a finite number",
        ),
        "seed": (lambda v: _whole(v, 0), "a whole number >= 0"),
        "num_classes": (lambda v: _whole(v, 1), "a whole number > 0"),
        "num_prompts": (lambda v: _whole(v, 1), "a whole number > 0"),
        "prompts_sha256": (_text, "a non-empty string"),
        "conditions": (lambda v: isinstance(v, list) and all(_text(c) for c in v), "a list of names"),
        "annotator": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    },
    "target": {
        **_COMMON,
        "data": (_text, "a non-empty string"),
        "codec": (_text, "a non-empty string"),
        "hflip": (lambda v: isinstance(v, bool), "true or false"),
        "conditions": (_text, "a non-empty string"),
    },
}
# what difftune reads from every manifest of a kind (the shard layout; a bank's sample space and model)
REQUIRED: dict[str, tuple[str, ...]] = {
    "bank": (
        "kind",
        "num_samples",
        "shard_size",
        "num_shards",
        "source",
        "source_fingerprint",
        "space",
        "shape",
    ),
    "target": ("kind", "num_samples", "shard_size", "num_shards"),
}


def _regenerate(root: Path, kind: Any) -> str:
    """How to replace a damaged store of ``kind``: the fix half of its refusals."""
    if kind == "target":
        return f"delete {root} and run again: difftune encodes the target set again"
    return f"regenerate the bank: delete {root} and run `difftune bank` again"


def check_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """``manifest`` (read from ``path``) if every field has a value of its kind and the shard count
    follows from ``num_samples`` and ``shard_size``; fields of other names are left alone.

    Raises:
        UserError: the first wrong or missing field, with the file, the field and how to regenerate it.
    """
    if not isinstance(manifest, dict):
        raise UserError(f"{path} holds no JSON object; {_regenerate(path.parent, None)}")
    kind = manifest.get("kind")
    known = kind if isinstance(kind, str) and kind in FIELDS else None  # else refused as a wrong kind
    fields = FIELDS[known] if known else _COMMON
    for key in REQUIRED[known] if known else ("kind",):
        if key not in manifest:
            raise UserError(f"{path} has no {key!r} field; {_regenerate(path.parent, kind)}")
    for key, (valid, wanted) in fields.items():
        if key in manifest and not valid(manifest[key]):
            raise UserError(
                f"{path} has {key}={manifest[key]!r}, which must be {wanted}; {_regenerate(path.parent, kind)}"
            )
    samples, size, shards = manifest["num_samples"], manifest["shard_size"], manifest["num_shards"]
    if shards != -(-samples // size):
        raise UserError(
            f"{path} has num_shards={shards}, but num_samples={samples} in shards of shard_size={size} make "
            f"{-(-samples // size)}; {_regenerate(path.parent, kind)}"
        )
    return manifest


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file ``path`` is not whole (its header does not parse, or the file is shorter
    or longer than the header says), or ``None``. Reads the header only."""
    try:
        with safe_open(str(path), framework="pt"):
            return None
    except (SafetensorError, OSError) as err:
        return str(err)


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
            UserError: the manifest is not JSON, or a field is wrong (:func:`check_manifest`).
        """
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not a difftune store: {MANIFEST} is missing")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is corrupt ({err}); delete the directory and regenerate it") from None
        return check_manifest(manifest, path)

    def shard_path(self, index: int) -> Path:
        """Path of shard ``index``."""
        return self.root / f"shard-{index:05d}.safetensors"

    def has_shard(self, index: int) -> bool:
        """True when shard ``index`` was written (:meth:`damaged_shards` tells whether it is still whole)."""
        return self.shard_path(index).is_file()

    def damaged_shards(self) -> list[int]:
        """Indices of written shards that are no longer whole (:func:`safetensors_problem`)."""
        return list(self._shard_problems())

    def _shard_problems(self) -> dict[int, str]:
        written = (i for i in range(self.manifest["num_shards"]) if self.has_shard(i))
        problems = {i: safetensors_problem(self.shard_path(i)) for i in written}
        return {i: problem for i, problem in problems.items() if problem is not None}

    def unfinished_shards(self, warn: bool = True) -> list[int]:
        """The shards a resumed writer must write: missing ones, and damaged ones (named in one warning
        when ``warn``); whole shards are left alone."""
        damaged = self._shard_problems()
        if damaged and warn:
            logger.warning(
                "%s: %d damaged shard(s) will be written again: %s",
                self.root,
                len(damaged),
                ", ".join(f"{self.shard_path(i).name} ({problem})" for i, problem in damaged.items()),
            )
        return sorted(self.missing_shards() + list(damaged))

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
        return [i for i in range(self.manifest["num_shards"]) if not self.has_shard(i)]

    def load(self, mapped: Sequence[str] = ()) -> dict[str, Any]:
        """All shards concatenated, in shard order; the keys in ``mapped`` as
        :class:`~difftune.io.mapped.MappedRows` read from the files on demand (memory-mapped), not loaded.

        Raises:
            ValueError: shards are missing or unreadable (the message says how to fix it).
        """
        missing = self.missing_shards()
        if missing:
            raise UserError(
                f"{self.root} is incomplete: {len(missing)} of {self.manifest['num_shards']} shards missing "
                f"(first: {missing[0]}); run the same generation command again to finish it"
            )
        paths = [self.shard_path(i) for i in range(self.manifest["num_shards"])]
        parts: dict[str, list[torch.Tensor]] = {}
        for path in paths:
            try:
                with safe_open(str(path), framework="pt") as shard:
                    for key in getattr(
                        shard, "offset_keys", shard.keys
                    )():  # the file's order, as load_file's
                        if key not in mapped:
                            parts.setdefault(key, []).append(shard.get_tensor(key))
            except (SafetensorError, OSError) as err:
                raise UserError(f"{path} is corrupt ({err}); delete it and rerun generation") from None
        tensors: dict[str, Any] = {key: torch.cat(values) for key, values in parts.items()}
        if mapped:
            from difftune.io.mapped import MappedRows

            tensors.update({key: MappedRows(paths, key) for key in mapped})
        return tensors
