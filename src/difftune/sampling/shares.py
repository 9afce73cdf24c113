"""Sampling work shared among the processes of a sharded run.

A sharded model's forward pass gathers each unit's weights from every process, so all of them must
run it together, as often. Rather than each computing the same images, each takes a share of the rows
(:func:`share_of_rows`) and the results are put back together in row order (:func:`gather_rows`).
Image ``i`` keeps its seed, so the result does not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.config.sampling import SamplingSpec
from difftune.sampling.generate import generate_with_spec


def share_of_rows(accelerator: Any | None, n: int) -> tuple[list[int], int]:
    """This process's share of ``n`` rows of work (images to sample) and the index of its first row.

    Each of ``accelerator``'s N processes takes ``ceil(n / N)`` consecutive rows, the last shares
    padded by repeating row ``n - 1``, so that every process runs the model on as many rows, as often;
    :func:`gather_rows` puts the results back together. Without an accelerator (the work is not
    shared): all rows.
    """
    if accelerator is None:
        return list(range(n)), 0
    per_process = -(-n // accelerator.num_processes)
    start = min(n, accelerator.process_index * per_process)
    stop = min(n, start + per_process)
    return list(range(start, stop)) + [n - 1] * (per_process - (stop - start)), start


def gather_rows(accelerator: Any | None, rows: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` rows of results whose work :func:`share_of_rows` shared out, from this process's share
    ``rows`` and every other's (call it on every process), padding dropped; ``rows`` when not shared."""
    if accelerator is None:
        return rows
    return accelerator.gather(rows.contiguous())[:n]


def generate_shared(
    backbone: Backbone,
    scheduler_config: dict[str, Any],
    spec: SamplingSpec,
    cond: Conditioning,
    decode: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device | str,
    shared: Any | None,
) -> torch.Tensor:
    """``decode`` of the samples of ``cond`` (sample ``i`` with seed ``spec.seed + i``), each process of
    ``shared`` making and decoding its share; all of them, in order, on every process. Without
    ``shared``: all of them here."""
    mine, first = share_of_rows(shared, cond.batch_size)
    x = generate_with_spec(
        backbone, scheduler_config, spec, cond.select(torch.tensor(mine)), first, device=device
    )
    return gather_rows(shared, decode(x), cond.batch_size)
