"""Memory-mapped rows of a sharded store: the same values as loading, read a batch at a time, and a run
that trains from them equal to one that loads them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difftune.backbones import load_pretrained
from difftune.bank import generate_bank
from difftune.errors import UserError
from difftune.io.mapped import MappedRows
from difftune.io.store import LatentStore
from difftune.training.loop import Trainer
from test_training import make_cfg, weights


def store(root: Path, sizes: list[int], dtype: torch.dtype = torch.float32) -> LatentStore:
    manifest = {"kind": "target", "format": 1, "num_samples": sum(sizes), "num_shards": len(sizes)}
    made = LatentStore.create(root, {**manifest, "shard_size": max(sizes)})
    start = 0
    for i, size in enumerate(sizes):
        rows = torch.arange(start, start + size, dtype=torch.float32)
        made.write_shard(
            i,
            {
                "samples": (rows.view(-1, 1, 1, 1) + torch.zeros(size, 2, 3, 3)).to(dtype),
                "labels": rows.long(),
            },
        )
        start += size
    return made


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mapped_rows_equal_the_loaded_tensor(tmp_path: Path, dtype: torch.dtype):
    saved = store(tmp_path / "s", [5, 3, 4], dtype)
    loaded = saved.load()
    mapped = saved.load(mapped=("samples",))
    rows = mapped["samples"]
    assert isinstance(rows, MappedRows) and torch.equal(mapped["labels"], loaded["labels"])
    assert rows.shape == loaded["samples"].shape and len(rows) == 12 and rows.dtype == dtype
    index = torch.tensor([11, 0, 5, 5, 7, 4])  # across shards, repeated, out of order
    assert torch.equal(rows[index], loaded["samples"][index])
    assert torch.equal(rows[2:9], loaded["samples"][2:9])
    assert torch.equal(rows[3], loaded["samples"][3])
    assert torch.equal(rows.materialise(), loaded["samples"])
    part = rows.subset(torch.tensor([9, 1, 6]))  # a view: nothing read until indexed
    assert len(part) == 3 and torch.equal(part[torch.tensor([2, 0])], loaded["samples"][torch.tensor([6, 9])])


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc/self/maps")
def test_reading_rows_keeps_no_mapping_of_the_shards(tmp_path: Path):
    """Rows are read, not mapped: a mapping's touched pages would stay in the run's resident memory."""
    saved = store(tmp_path / "s", [50, 50])
    rows = saved.load(mapped=("samples",))["samples"]
    values = rows[torch.randint(0, 100, (64,))]
    assert values.shape == (64, 2, 3, 3) and torch.equal(rows.materialise(), saved.load()["samples"])
    maps = Path("/proc/self/maps").read_text()
    assert str(saved.shard_path(0)) not in maps and str(saved.shard_path(1)) not in maps


def test_shard_cut_short_after_opening_is_refused_in_one_line(tmp_path: Path):
    saved = store(tmp_path / "s", [4, 4])
    rows = saved.load(mapped=("samples",))["samples"]
    shard = saved.shard_path(1)
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(UserError, match="cannot read") as err:
        rows[torch.tensor([7])]
    assert "\n" not in str(err.value)


def test_truncated_shard_is_refused_in_one_line(tmp_path: Path):
    saved = store(tmp_path / "s", [4, 4])
    shard = saved.shard_path(1)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated") as err:
        MappedRows([saved.shard_path(0), shard], "samples")
    assert "\n" not in str(err.value)


def test_training_from_mapped_rows_equals_training_from_memory(dit_dir: Path, tmp_path: Path, monkeypatch):
    bank = tmp_path / "bank"
    args = ("train.evaluation.holdout=4", "train.evaluation.bank_holdout=4", "train.eval_every=2")
    generate_bank(load_pretrained(str(dit_dir)), make_cfg(dit_dir, tmp_path / "x", bank).bank, progress=False)
    mapped_run = Trainer(make_cfg(dit_dir, tmp_path / "mapped", bank, *args))
    assert isinstance(mapped_run.parts.target.samples, MappedRows)  # the run reads from the files
    assert isinstance(mapped_run.parts.bank, MappedRows)
    mapped = mapped_run.train()
    original = LatentStore.load

    def in_memory(self: LatentStore, mapped: tuple[str, ...] = ()) -> dict:
        return original(self)

    monkeypatch.setattr(LatentStore, "load", in_memory)
    loaded = Trainer(make_cfg(dit_dir, tmp_path / "loaded", bank, *args)).train()
    a, b = weights(mapped), weights(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)
