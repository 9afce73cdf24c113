"""One rank of the CPU FSDP2 test (tests/test_fsdp.py), started by torchrun.

Usage::

    ACCELERATE_USE_CPU=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/fsdp_worker.py RESULT_DIR section.key=value ...

The trainer gets the accelerator ``accelerate launch`` with an FSDP2 config gives on GPUs
(:func:`difftune.testing.sharding.cpu_fsdp2_accelerator`; the test exports the ``FSDP_*`` variables of
configs/accelerate/fsdp2.yaml). The bank must exist (the test generates it).
``DIFFTUNE_TEST_NAN_ON_RANK_1`` as in tests/ddp_worker.py; ``DIFFTUNE_TEST_WHOLE_MODEL_CHECKPOINTS=1``
writes checkpoints as difftune did before a sharded adapter run's held only what trains (the whole
sharded model). Writes ``RESULT_DIR/rank-<process_index>.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ddp_worker import nan_on_rank_1
from difftune.config.experiment import load_config
from difftune.testing.sharding import cpu_fsdp2_accelerator
from difftune.training.loop import Trainer


def main(argv: list[str]) -> None:
    result_dir, overrides = Path(argv[0]), argv[1:]
    cfg = load_config(None, overrides)
    tc = cfg.train
    nan_on_rank_1()  # DIFFTUNE_TEST_NAN_ON_RANK_1, as in the DDP test
    if os.environ.get("DIFFTUNE_TEST_WHOLE_MODEL_CHECKPOINTS") == "1":
        import difftune.training.loop

        difftune.training.loop.sharded_trainable_only = lambda accelerator, model: contextlib.nullcontext()
    trainer = Trainer(cfg, accelerator=cpu_fsdp2_accelerator(tc.mixed_precision, tc.report_to, tc.output_dir))
    final = trainer.train()
    acc, backbone = trainer.accelerator, trainer.backbone
    params = list(backbone.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    record = {
        "process_index": acc.process_index,
        "num_processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "sharded_parameters": sum(isinstance(p, DTensor) for p in params),
        "parameters": len(params),
        "local_elements": local,
        "total_elements": sum(p.numel() for p in params),
        "ema_sharded": trainer.ema is not None
        and all(isinstance(p, DTensor) for p in trainer.ema.shadow_params),
        "final": str(final),
        "wrapped": sorted({type(m).__name__ for m in backbone.modules() if "FSDP" in type(m).__name__}),
        "threads": torch.get_num_threads(),
    }
    result_dir.mkdir(parents=True, exist_ok=True)
    (result_dir / f"rank-{acc.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
