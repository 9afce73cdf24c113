"""One rank of the CPU DDP test (tests/test_training.py), started by torchrun.

Usage::

    ACCELERATE_USE_CPU=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/ddp_worker.py RESULT_DIR section.key=value ...

Builds the config from the overrides, generates the knowledge bank (shards split between the
ranks), trains, and writes ``RESULT_DIR/rank-<process_index>.json`` with what this rank saw:
process index, number of processes, the bank shards it wrote, the final directory and the fitted
data-driven schedules it trained with (``None`` without them).

``DIFFTUNE_TEST_NAN_ON_RANK_1=2,3`` makes the loss of those (1-based) objective calls NaN on rank 1
only, as a bad batch on one replica would.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from difftune.backbones import load_pretrained
from difftune.bank import generate_bank
from difftune.config.experiment import load_config
from difftune.io.store import LatentStore
from difftune.objectives import DiffTuningLoss
from difftune.training.loop import Trainer


def nan_on_rank_1() -> None:
    """Make the loss of the objective calls ``DIFFTUNE_TEST_NAN_ON_RANK_1`` lists NaN on rank 1 only."""
    bad_calls = {int(c) for c in os.environ.get("DIFFTUNE_TEST_NAN_ON_RANK_1", "").split(",") if c}
    if not bad_calls or os.environ.get("RANK") != "1":
        return
    original, calls = DiffTuningLoss.__call__, []

    def sometimes_nan(self: DiffTuningLoss, *args):  # noqa: ANN202
        terms = original(self, *args)
        calls.append(1)
        if len(calls) in bad_calls:
            terms.loss = terms.loss * float("nan")
        return terms

    DiffTuningLoss.__call__ = sometimes_nan  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    result_dir, overrides = Path(argv[0]), argv[1:]
    cfg = load_config(None, overrides)

    written: list[int] = []
    original_write = LatentStore.write_shard

    def recording_write(self: LatentStore, index: int, tensors: dict) -> None:
        written.append(index)
        original_write(self, index, tensors)

    LatentStore.write_shard = recording_write  # type: ignore[method-assign]
    generate_bank(load_pretrained(cfg.model.pretrained), cfg.bank, progress=False)
    LatentStore.write_shard = original_write  # type: ignore[method-assign]

    nan_on_rank_1()
    trainer = Trainer(cfg)
    final = trainer.train()
    acc = trainer.accelerator
    record = {
        "process_index": acc.process_index,
        "num_processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "bank_shards": written,
        "final": str(final),
        "data_schedule": None if trainer.data_schedule is None else trainer.data_schedule.to_dict(),
    }
    result_dir.mkdir(parents=True, exist_ok=True)
    (result_dir / f"rank-{acc.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
