"""Sharded training (FSDP2) on CPU processes, for tests and benchmarks.

accelerate 1.16 keeps a multi-CPU launch data-parallel whatever its FSDP settings, while torch's FSDP2
shards over gloo. :func:`cpu_fsdp2_accelerator` builds the accelerator that ``accelerate launch`` with
an FSDP2 config gives on GPUs (its plugin reads the ``FSDP_*`` variables :func:`fsdp_launch_env`
returns) and sets its distributed type to FSDP, so that ``prepare``, ``save_state`` and ``load_state``
take accelerate's FSDP2 paths on CPU processes started with ``ACCELERATE_USE_CPU=1``.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from difftune.training.outputs import tracker

# the shipped FSDP2 config, in a checkout of the repository
SHIPPED_FSDP2 = Path(__file__).resolve().parents[3] / "configs" / "accelerate" / "fsdp2.yaml"


def fsdp_launch_env(config_file: Path = SHIPPED_FSDP2) -> dict[str, str]:
    """The ``FSDP_*`` variables ``accelerate launch --config_file config_file`` exports to its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "difftune", "train"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {key: value for key, value in env.items() if key.startswith("FSDP_")}


def cpu_fsdp2_accelerator(mixed_precision: str, report_to: str, project_dir: str) -> Accelerator:
    """An accelerator of this CPU process that shards as FSDP2 does on GPUs (the plugin from ``FSDP_*``),
    made as :class:`~difftune.training.loop.Trainer` makes its own (precision, tracker, folder)."""
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
