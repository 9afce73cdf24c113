"""One rank of the CPU FSDP2 test (tests/test_fsdp.py), started by torchrun.

Usage::

    ACCELERATE_USE_CPU=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/fsdp_worker.py RESULT_DIR section.key=value ...

accelerate refuses FSDP on a CPU (it keeps a multi-CPU launch data-parallel), while torch's FSDP2
shards over gloo. This worker builds the accelerator difftune would get from ``accelerate launch``
with an FSDP2 config on GPUs (its plugin reads the ``FSDP_*`` variables the launcher exports; the
test exports those of configs/accelerate/fsdp2.yaml) and sets its distributed type to FSDP, so that
``accelerator.prepare``, ``save_state`` and ``load_state`` take their FSDP2 paths on the CPU. The
bank must exist (the test generates it). ``DIFFTUNE_TEST_NAN_ON_RANK_1`` as in tests/ddp_worker.py. Writes ``RESULT_DIR/rank-<process_index>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

from ddp_worker import nan_on_rank_1
from difftune.config.experiment import load_config
from difftune.training.loop import Trainer
from difftune.training.outputs import tracker


def fsdp2_accelerator(mixed_precision: str, report_to: str, project_dir: str) -> Accelerator:
    """An accelerator on 2 CPU processes that shards as FSDP2 would on GPUs (the plugin from ``FSDP_*``)."""
    plugin = FullyShardedDataParallelPlugin()
    acc = Accelerator(
        mixed_precision=mixed_precision,
        log_with=tracker(report_to),
        project_dir=project_dir,
        fsdp_plugin=plugin,
    )
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return acc


def main(argv: list[str]) -> None:
    result_dir, overrides = Path(argv[0]), argv[1:]
    cfg = load_config(None, overrides)
    tc = cfg.train
    nan_on_rank_1()  # DIFFTUNE_TEST_NAN_ON_RANK_1, as in the DDP test
    trainer = Trainer(cfg, accelerator=fsdp2_accelerator(tc.mixed_precision, tc.report_to, tc.output_dir))
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
