"""A knowledge bank of a bucketed target (``data.buckets``): one bank per bucket, at its size.

Each step takes its bank rows from the bucket its target rows come from, so the bank holds samples of
every bucket of the target, in proportion to the target's images per bucket
(:func:`~difftune.data.buckets.bank_shares`, at least one each). Bucket b's samples are an ordinary
bank in ``bank.path/bucket-<W>x<H>`` whose manifest records its shape and ``first_index``; sample i of
it is index ``first_index + i`` of the whole bank (its condition, prompt ``i mod P``, and its seed
``seed + first_index + i``), so the banks of all buckets together are one set of distinct seeds.
``bank.path/buckets.json`` lists the buckets, their sample counts and the bucket settings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from difftune.backbones.conditioning import Conditioning
from difftune.backbones.loading import LoadedModel
from difftune.bank.conditions import RunBank, check_bank_conditions, manifest_sampling
from difftune.bank.generate import generate_bank, load_bank
from difftune.config.experiment import ExperimentConfig
from difftune.data.buckets import (
    Bucket,
    BucketPlan,
    BucketRows,
    bank_shares,
    check_bucket_fit,
    check_bucket_model,
)
from difftune.errors import UserError
from difftune.io.atomic import atomic_write_json
from difftune.io.store import LatentStore

INDEX = "buckets.json"


def target_plan(cfg: ExperimentConfig, loaded: LoadedModel) -> BucketPlan:
    """The buckets of the target images of ``cfg`` (from their headers; nothing is encoded).

    Raises:
        UserError: the model cannot take buckets, or the data cannot be read.
    """
    from difftune.data.targets import planned_buckets

    check_bucket_model(loaded.backbone, loaded.codec.downsample, cfg.data.buckets)
    plan = planned_buckets(cfg.data)
    check_bucket_fit(loaded.backbone, plan.buckets, loaded.codec.downsample)
    return plan


def _index(cfg: ExperimentConfig, plan: BucketPlan, shares: list[int]) -> dict[str, Any]:
    return {
        "kind": "bucketed_bank",
        "buckets": [[b.width, b.height, n] for b, n in zip(plan.buckets, shares, strict=True)],
        "settings": dataclasses.asdict(cfg.data.buckets) | {"resolution": plan.resolution},
        "num_samples": cfg.bank.num_samples,
    }


def generate_bucket_bank(
    loaded: LoadedModel,
    cfg: ExperimentConfig,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> BucketPlan:
    """Generate (or finish) the bank of every bucket of the target of ``cfg`` into ``bank.path``.

    Returns:
        The target's buckets.

    Raises:
        UserError: the model cannot sample at other sizes, fewer samples than buckets, or ``bank.path``
            holds a bank of other buckets.
    """
    plan = target_plan(cfg, loaded)
    shares = bank_shares(plan.counts, cfg.bank.num_samples)
    root, index = Path(cfg.bank.path), _index(cfg, plan, shares)
    found = root / INDEX
    if found.is_file() and json.loads(found.read_text()) != index:
        raise UserError(
            f"{root} already holds a bank of other buckets or settings ({found}); use another bank.path or delete it"
        )
    channels, first = loaded.backbone.sample_shape[0], 0
    for bucket, count in zip(plan.buckets, shares, strict=True):
        sub = dataclasses.replace(cfg.bank, path=str(root / bucket.folder), num_samples=count)
        shape = bucket.sample_shape(channels, loaded.codec.downsample)
        generate_bank(loaded, sub, device, progress, shape=shape, first_index=first)
        first += count
    atomic_write_json(found, index)
    return plan


def bank_buckets(root: Path) -> list[Bucket]:
    """The buckets the bank at ``root`` holds (its ``buckets.json``).

    Raises:
        UserError: it holds none (a bank made without ``data.buckets``, or none at all).
    """
    if not (root / INDEX).is_file():
        raise UserError(
            f"bank {root} holds no buckets ({INDEX}): generate it with data.buckets enabled (`difftune bank`)"
        )
    return [Bucket(w, h) for w, h, _ in json.loads((root / INDEX).read_text())["buckets"]]


def load_bucket_bank(cfg: ExperimentConfig, loaded: LoadedModel) -> RunBank:
    """The bank of every bucket at ``bank.path``, checked against the model, in one index space.

    Raises:
        UserError: the bank has no buckets, or one of them is missing, damaged or not this model's.
    """
    root = Path(cfg.bank.path)
    buckets = bank_buckets(root)
    samples, conds, seeds, sampling = [], [], [], None
    downsample, channels = loaded.codec.downsample, loaded.backbone.sample_shape[0]
    for bucket in buckets:
        path = root / bucket.folder
        shape = bucket.sample_shape(channels, downsample)
        bank = load_bank(path, loaded, cfg.bank.made_by == "this_model", mapped=True, shape=shape)
        manifest = LatentStore(path).manifest
        check_bank_conditions(manifest, loaded.backbone, cfg.data.annotator, str(path))
        names = [name for name in loaded.backbone.condition_names if name in bank]
        samples.append(bank["samples"])
        conds.append(Conditioning({name: bank[name] for name in names}, len(bank["seeds"])))
        seeds.append(bank["seeds"])
        sampling = sampling or manifest_sampling(manifest)
    return RunBank(BucketRows(samples), Conditioning.cat(conds), torch.cat(seeds), sampling, buckets)
