"""The target set's cache: its images encoded once (VAE posterior mean and std, or pixels) with their
conditions, in safetensors shards written and resumed shard by shard, and keyed by what made them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difftune.backbones.base import ClassConditionalBackbone
from difftune.backbones.codec import LatentCodec
from difftune.backbones.family import TargetConditioner
from difftune.data.images import TargetImages
from difftune.errors import UserError
from difftune.io.store import LatentStore

CACHE_FORMAT = 1


def check_cache_dir(cache_dir: Path) -> LatentStore:
    """The store in ``cache_dir``, refused if it is someone else's (a bank?), which is never touched.

    Raises:
        UserError: ``cache_dir`` holds a store that is not a target cache.
    """
    store = LatentStore(cache_dir)
    if cache_dir.joinpath("manifest.json").is_file() and store.manifest.get("kind") != "target":
        raise UserError(
            f"data.cache_dir {str(cache_dir)!r} holds a {store.manifest.get('kind')!r} store, not a target "
            "cache; point data.cache_dir at an empty folder or at an earlier target cache"
        )
    return store


def encode_and_cache(
    target: TargetImages,
    codec: LatentCodec,
    cache_dir: str | Path,
    codec_identity: str,
    hflip: bool = False,
    batch_size: int = 32,
    shard_size: int = 4096,
    device: torch.device | str = "cpu",
    conditions: TargetConditioner | None = None,
    mapped: bool = False,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Encode target images once into the diffusion space and cache them; reuse a matching cache.

    Images are loaded and encoded one chunk at a time and written in shards, so an interrupted
    encoding resumes where it stopped. With ``hflip`` every image is cached a second time, mirrored
    (DiT's random horizontal flip, done once instead of at every step).

    ``conditions`` makes each image's condition tensors (the model family's
    :meth:`~difftune.backbones.family.ModelFamily.target_conditioner`; default: its class label).
    ``record`` adds to the manifest (a bucket's size and settings), so that other values re-encode.

    Returns:
        ``{"samples": posterior mean (M, C, h, w), "std": posterior std (M, C, h, w)}`` and the
        condition tensors (class labels (M,) by default), with M = N, or 2N with ``hflip``. With
        ``mapped``, ``samples`` and ``std`` are :class:`~difftune.io.mapped.MappedRows` read from the
        cache's files on demand.
    """
    n = len(target)
    manifest = {
        "kind": "target",
        "format": CACHE_FORMAT,
        "data": target.identity,
        "codec": codec_identity,
        "hflip": hflip,
        "num_samples": n,
        "shard_size": shard_size,
        "num_shards": -(-n // shard_size),
        **(record or {}),
    }
    if conditions is not None and conditions.identity is not None:
        manifest["conditions"] = conditions.identity
    cache_dir = Path(cache_dir)
    store = check_cache_dir(cache_dir)
    if cache_dir.joinpath("manifest.json").is_file() and store.manifest != manifest:
        store.clear()  # a stale cache of other data or another encoder: only its own files go
    fresh = not cache_dir.joinpath("manifest.json").is_file()
    store = LatentStore.create(cache_dir, manifest)
    missing = store.unfinished_shards()
    try:
        _encode_shards(target, codec, store, missing, hflip, batch_size, shard_size, device, conditions)
    except Exception:
        if fresh and len(store.missing_shards()) == manifest["num_shards"]:
            store.clear()  # nothing encoded yet: leave no cache that describes data it does not hold
        raise
    return store.load(mapped=("samples", "std") if mapped else ())


def _encode_shards(
    target: TargetImages,
    codec: LatentCodec,
    store: LatentStore,
    missing: list[int],
    hflip: bool,
    batch_size: int,
    shard_size: int,
    device: torch.device | str,
    conditions: TargetConditioner | None,
) -> None:
    """Encode and write the shards numbered ``missing`` (each shard written whole, or not at all)."""
    n = len(target)
    if missing:
        codec.to(device)
    quiet = {} if missing else {"disable": True}  # explicit disable only when idle: TQDM_DISABLE still works
    for shard in tqdm(missing, desc="encoding target", leave=False, **quiet):
        indices = torch.arange(shard * shard_size, min((shard + 1) * shard_size, n))
        parts: dict[str, list[torch.Tensor]] = {}
        variants = (False, True) if hflip else (False,)
        for chunk in indices.split(batch_size):
            images = target.load(chunk)
            for flipped in variants:
                variant = images.flip(-1) if flipped else images
                mean, std = codec.encode(variant.to(device))
                conds = (
                    conditions(chunk, variant, flipped)
                    if conditions
                    else ClassConditionalBackbone.condition(target.labels[chunk])
                )
                for key, value in {"samples": mean.cpu(), "std": std.cpu(), **conds}.items():
                    parts.setdefault(key, []).append(value)
        store.write_shard(shard, {key: torch.cat(values) for key, values in parts.items()})
