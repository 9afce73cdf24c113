"""Reading the next step's rows in the background while this step trains.

A run's target set and bank are memory-mapped (:class:`~difftune.io.mapped.MappedRows`): a batch's
rows are read from the files when the batch is made. Which rows step k + 1 takes is known at step k
(the index streams are deterministic: :meth:`~difftune.training.streams.IndexStream.peek`), so
:class:`RowPrefetcher` reads them in a worker thread meanwhile. A read that was not asked for ahead,
or asked for other rows, is done on the spot: prefetching changes when rows are read, never which.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from difftune.io.mapped import MappedRows, RowReader


class RowPrefetcher:
    """Rows of named sets, read ahead in one worker thread (in-memory tensors are indexed directly)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, tuple[torch.Tensor, Future[torch.Tensor]]] = {}

    def ask(self, name: str, values: torch.Tensor | MappedRows, indices: torch.Tensor) -> None:
        """Start reading rows ``indices`` of ``values`` (a no-op for a tensor in memory; sets on disk:
        :class:`~difftune.io.mapped.MappedRows`, or one per bucket, ``BucketRows``)."""
        if isinstance(values, torch.Tensor):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="difftune-prefetch")
        self._pending[name] = (indices.clone(), self._pool.submit(values.__getitem__, indices))

    def read(self, name: str, values: torch.Tensor | MappedRows, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` of ``values``: the read asked for ahead when it was for these rows."""
        pending = self._pending.pop(name, None)
        if pending is not None and torch.equal(pending[0], indices):
            return pending[1].result()
        return values[indices]

    def reader(self, prefix: str) -> RowReader:
        """:meth:`read` for one stream: its sets' names are prefixed with ``prefix``."""
        return lambda name, values, indices: self.read(f"{prefix}/{name}", values, indices)

    def close(self) -> None:
        """Stop the worker (pending reads are dropped)."""
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
