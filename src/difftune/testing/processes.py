"""Starting local multi-process runs (torchrun) for tests and benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path


def torchrun_command(*args: str | Path, processes: int = 2) -> list[str]:
    """The command that runs ``args`` (a script and its arguments, or ``-m module ...``) as ``processes``
    local processes: ``python -m torch.distributed.run --standalone --nproc_per_node N ...``. On a machine
    without a GPU, give the processes ``ACCELERATE_USE_CPU=1`` so accelerate joins them over gloo."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
    ]
    return [*launcher, *map(str, args)]
