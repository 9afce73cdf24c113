"""Deterministic, resumable sources of randomness for training.

Every random choice of a training step is drawn from a generator seeded by (run seed, step) for
the *global* batch, and each process takes its slice. So a run is the same on one process or on
several, and resuming at step k needs nothing but k and the index streams' positions.
"""

from __future__ import annotations

import copy
import hashlib

import torch

from difftune.errors import UserError


def step_generator(seed: int, step: int, stream: str = "train") -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, step, stream): independent per step and stream."""
    digest = hashlib.blake2b(f"{seed}:{step}:{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class IndexStream:
    """An endless stream of dataset indices: a fresh seeded permutation every epoch.

    Its position (epoch, offset) is its whole state, saved in checkpoints to resume exactly.

    Args:
        size: dataset size (> 0).
        seed: seed of the permutations.
    """

    def __init__(self, size: int, seed: int) -> None:
        if size <= 0:
            raise ValueError("cannot stream indices of an empty dataset")
        self.size, self.seed = size, seed
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.size, generator=step_generator(self.seed, epoch, "epoch"))

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` indices (LongTensor (n,)), crossing epoch boundaries as needed."""
        out = []
        while n > 0:
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            k = min(n, self.size - self.offset)
            out.append(self._perm[self.offset : self.offset + k])
            self.offset += k
            n -= k
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    def peek(self, n: int) -> torch.Tensor:
        """The indices the next :meth:`take` of ``n`` will return, without moving the stream."""
        return copy.copy(self).take(n)

    def state_dict(self) -> dict[str, int]:
        """Position and identity of the stream."""
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position saved by :meth:`state_dict` (the dataset must be the same size)."""
        if state["size"] != self.size:
            raise UserError(
                f"checkpoint was made with a dataset of {state['size']} samples, this one has {self.size}; "
                "resume with the same data"
            )
        self.seed, self.epoch, self.offset = state["seed"], state["epoch"], state["offset"]
        self._perm = self._permutation(self.epoch)


def step_bucket(seed: int, step: int, weights: torch.Tensor) -> int:
    """The bucket step ``step`` draws from (``data.buckets``): bucket b with probability ``weights[b]``
    over their sum, from the step's own generator, so a resumed run draws the same buckets."""
    return int(torch.multinomial(weights, 1, generator=step_generator(seed, step, "bucket")))


class BucketStreams:
    """One :class:`IndexStream` per bucket of a set whose buckets' rows follow each other (``sizes[b]``
    rows each, from ``starts[b]``): a step takes its indices from one bucket.

    Its positions are the streams' positions, saved in checkpoints to resume exactly.

    Args:
        sizes: rows of each bucket (> 0 each).
        seed: seed of the permutations (each bucket's own is derived from it).
    """

    def __init__(self, sizes: list[int], seed: int) -> None:
        self.streams = [IndexStream(size, seed + 1_000_003 * (b + 1)) for b, size in enumerate(sizes)]
        self.starts = [sum(sizes[:b]) for b in range(len(sizes))]

    def take(self, n: int, bucket: int) -> torch.Tensor:
        """The next ``n`` indices of ``bucket`` (indices of the whole set)."""
        return self.starts[bucket] + self.streams[bucket].take(n)

    def peek(self, n: int, bucket: int) -> torch.Tensor:
        """The indices the next :meth:`take` of ``n`` from ``bucket`` will return, without moving it."""
        return self.starts[bucket] + self.streams[bucket].peek(n)

    def state_dict(self) -> dict[str, list[dict[str, int]]]:
        """Positions of every bucket's stream."""
        return {"buckets": [stream.state_dict() for stream in self.streams]}

    def load_state_dict(self, state: dict[str, list[dict[str, int]]]) -> None:
        """Restore positions saved by :meth:`state_dict` (the same buckets, of the same sizes)."""
        saved = state.get("buckets") if isinstance(state, dict) else None
        if saved is None or len(saved) != len(self.streams):
            raise UserError(
                f"checkpoint was made with {'no' if saved is None else len(saved)} buckets, this run has "
                f"{len(self.streams)}; resume with the same data and data.buckets"
            )
        for stream, position in zip(self.streams, saved, strict=True):
            stream.load_state_dict(position)
