"""The knowledge bank each stage of a task sequence replays (``continual.bank_policy``).

Model ``j`` is the sequence's model after stage ``j`` (model 0: the original one); ``banks/model<j>``
is a bank of model ``j``, made with the config's ``bank`` settings, over the label rows model ``j``
has learned (the source's classes and tasks 1..j):

* ``pretrained``: every stage replays ``banks/model0`` (or the bank given as ``bank.path``);
* ``previous``: stage ``k`` replays ``banks/model<k-1>``;
* ``accumulate``: stage ``k`` replays ``banks/merged<k>``, a uniform sample of at most
  ``continual.bank_cap`` samples of ``banks/model0 .. model<k-1>``, drawn as a reservoir (Vitter's
  algorithm R over the banks in order, seeded by ``continual.seed``), so that stage ``k``'s bank
  keeps what stage ``k - 1``'s kept except for the places new samples took. Each sample's ``stages``
  entry records the model that made it.

A bank is made once and resumed like any bank (finished shards are kept).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from difftune.continual.plan import SequencePlan, StartModel
from difftune.io.store import LatentStore

MERGED_FORMAT = 1


def model_bank_dir(plan: SequencePlan, j: int) -> Path:
    """Where the bank of model ``j`` lives (the given ``bank.path`` for model 0 when there is one)."""
    if j == 0 and plan.own_bank:
        return Path(plan.own_bank)
    return plan.out / "banks" / f"model{j}"


def banks_needed(plan: SequencePlan, k: int) -> list[int]:
    """The models whose banks stage ``k`` (1-based) replays, in stream order."""
    policy = plan.spec.bank_policy
    if policy == "pretrained":
        return [0]
    return [k - 1] if policy == "previous" else list(range(k))


def make_model_bank(plan: SequencePlan, j: int, model: StartModel, progress: bool = True) -> Path:
    """Make (or finish) the bank of model ``j`` and return its folder."""
    from difftune.bank.conditions import prepare_bank_conditions
    from difftune.bank.generate import generate_bank

    path = model_bank_dir(plan, j)
    store = LatentStore(path)
    if (path / "manifest.json").is_file() and not store.unfinished_shards(warn=False):
        return path
    loaded = plan.load(model)
    # a text model's bank prompts come from the data of the first stage that replays the bank
    prepare_bank_conditions(loaded, dataclasses.replace(plan.base, data=plan.task_data(j + 1)))
    generate_bank(loaded, dataclasses.replace(plan.base.bank, path=str(path)), progress=progress)
    return path


def reservoir(stream: list[tuple[int, int]], cap: int, seed: int) -> list[tuple[int, int]]:
    """A uniform sample of at most ``cap`` items of ``stream``, by algorithm R: the first ``cap`` fill
    the reservoir; item ``n`` (0-based) then takes slot ``u`` when a uniform draw ``u`` in ``0..n`` is
    below ``cap``. A longer stream with the same start keeps the same draws for that start."""
    generator = torch.Generator().manual_seed(seed)
    kept: list[tuple[int, int]] = []
    for n, item in enumerate(stream):
        if n < cap:
            kept.append(item)
            continue
        slot = int(torch.randint(0, n + 1, (1,), generator=generator))
        if slot < cap:
            kept[slot] = item
    return kept


def merged_bank(plan: SequencePlan, k: int) -> Path:
    """Write ``banks/merged<k>`` from the banks of models ``0..k-1`` (made before) and return it."""
    path = plan.out / "banks" / f"merged{k}"
    sources = [LatentStore(model_bank_dir(plan, j)) for j in range(k)]
    sizes = [int(store.manifest["num_samples"]) for store in sources]
    cap = plan.spec.bank_cap or plan.base.bank.num_samples
    kept = reservoir([(j, i) for j, n in enumerate(sizes) for i in range(n)], cap, plan.spec.seed)
    first = sources[0].manifest
    manifest = {
        **first,
        "source": f"merged: {', '.join(str(store.root) for store in sources)}",
        "merged_format": MERGED_FORMAT,
        "merged_from": [store.manifest["source_fingerprint"] for store in sources],
        "bank_cap": cap,
        "reservoir_seed": plan.spec.seed,
        "num_samples": len(kept),
        "num_shards": -(-len(kept) // first["shard_size"]),
        "num_classes": max(int(store.manifest.get("num_classes", 1)) for store in sources),
    }
    store = LatentStore.create(path, manifest, informational=("source",))
    if not store.unfinished_shards(warn=False):
        return path
    tensors = [source.load() for source in sources]
    picked: dict[str, torch.Tensor] = {}
    for key in tensors[0]:
        picked[key] = torch.stack([tensors[j][key][i] for j, i in kept])
    picked["stages"] = torch.tensor([j for j, _ in kept], dtype=torch.long)
    size = int(first["shard_size"])
    for shard in range(manifest["num_shards"]):
        part = slice(shard * size, (shard + 1) * size)
        store.write_shard(shard, {key: value[part] for key, value in picked.items()})
    return path


def stage_bank(plan: SequencePlan, k: int) -> str | None:
    """The bank stage ``k`` replays (made first if needed; the models' banks must exist), or ``None``
    when the objective replays none."""
    if not plan.base.reads_bank:
        return None
    if plan.spec.bank_policy == "accumulate":
        return str(merged_bank(plan, k))
    return str(model_bank_dir(plan, banks_needed(plan, k)[0]))
