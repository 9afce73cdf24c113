"""Automatic cache of reference-set feature statistics for ``difftune eval fid``.

Encoding a large reference folder is the slow part of repeated FID evaluations, so its
:class:`~difftune.metrics.FeatureStats` are stored under a key that covers everything they depend on:

- the reference set: every file's path relative to the folder, its size and its modification time
  (:func:`difftune.io.store.folder_identity`), or the name of a built-in dataset;
- the feature extractor: ``inception`` with the identity (resolved path, size, modification time) of
  its weights file, or ``digits:PATH`` with the classifier file's identity;
- the ``--resize`` setting.

An added, removed, replaced or touched image, or other weights, gives a new key, so a stale entry is
never used. ``module:function`` extractors are not cached: their code can change without a trace on
disk (save the statistics explicitly with ``--save-real-stats`` instead).
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

from difftune.io.store import user_cache_dir
from difftune.metrics.fid import FeatureStats

CACHE_VERSION = 1


def _file_identity(path: Path) -> list[str | int]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _extractor_identity(features: str, inception_weights: str | None) -> list | None:
    """What identifies the extractor's weights, or ``None`` for extractors that are not cached."""
    kind, _, rest = features.partition(":")
    if kind == "inception" and not rest:
        weights = inception_weights
    elif kind == "digits":
        weights = rest
    else:
        return None
    if weights is None:
        return [kind, "torch-fidelity"]  # torch-fidelity's own download of the standard weights
    # a missing file is not cached here: building the extractor reports it
    return [kind, _file_identity(Path(weights))] if Path(weights).is_file() else None


def reference_stats_key(
    reference: Any, features: str, inception_weights: str | None = None, resize: int | None = None
) -> str | None:
    """The cache key of a reference set's statistics, or ``None`` if they are not cacheable.

    Args:
        reference: JSON-serialisable identity of the reference images: :func:`difftune.io.store.folder_identity` of a
            folder, or the spec of a built-in dataset (e.g. ``"digits:5,6,7,8,9"``).
        features: the ``--features`` spec.
        inception_weights: the local Inception weights file, if any.
        resize: the ``--resize`` setting.
    """
    extractor = _extractor_identity(features, inception_weights)
    if extractor is None:
        return None
    payload = {"version": CACHE_VERSION, "extractor": extractor, "resize": resize, "reference": reference}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]


def load_cached_stats(path: Path, count: int) -> FeatureStats | None:
    """The statistics cached at ``path`` if it holds a readable entry for ``count`` images, else ``None``."""
    if not path.is_file():
        return None
    try:
        stats = FeatureStats.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # a damaged entry is recomputed and overwritten
    return stats if stats.count == count else None


def reference_cache_file(
    reference: Any,
    features: str,
    inception_weights: str | None = None,
    resize: int | None = None,
    cache_dir: str | None = None,
) -> Path | None:
    """Where the statistics of ``reference`` are cached (``cache_dir``, default
    ``$XDG_CACHE_HOME/difftune/fid_stats``), or ``None`` when they are not cacheable (see
    :func:`reference_stats_key`)."""
    key = reference_stats_key(reference, features, inception_weights, resize)
    if key is None:
        return None
    return Path(cache_dir or user_cache_dir() / "fid_stats") / f"{key}.npz"


def write_cached_stats(stats: FeatureStats, path: Path) -> None:
    """Cache the reference statistics; a cache that cannot be written only costs time, so it only warns."""
    try:
        stats.save(path)
    except OSError as err:
        print(
            f"difftune: warning: could not cache the reference statistics in {path}: {err}", file=sys.stderr
        )
