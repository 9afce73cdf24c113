"""The conditioning bundle a backbone consumes: named tensors that share the batch dimension.

A class-conditional model reads ``{"labels": (N,)}``; a text model will read prompt embeddings, a
ControlNet prompt embeddings and a control image. Everything between the data and the backbone (the
trainer's batches, the objective, the sampler) only slices, concatenates and moves a bundle; what
its tensors mean, what "unconditional" is and how the classifier-free-guidance drop works belong to
the backbone (:class:`~difftune.backbones.base.Backbone`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch


class Conditioning(Mapping[str, torch.Tensor]):
    """An immutable mapping of conditioning tensors, each of shape (N, ...) for a batch of N samples.

    An unconditional model's bundle holds no tensors; it still knows how many samples it conditions.

    Args:
        tensors: name -> tensor; every tensor has the same first dimension N.
        batch_size: N, required when ``tensors`` is empty.

    Raises:
        ValueError: the tensors disagree on N (or with ``batch_size``), or N is unknown.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], batch_size: int | None = None) -> None:
        self._tensors = dict(tensors)
        sizes = {name: t.shape[0] for name, t in self._tensors.items()}
        if batch_size is not None:
            sizes["batch_size"] = batch_size
        if len(set(sizes.values())) != 1:
            raise ValueError(f"conditioning tensors must share their batch dimension, got {sizes or 'none'}")
        self._size = next(iter(sizes.values()))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        """Number of entries (names); the batch size is :attr:`batch_size`."""
        return len(self._tensors)

    @property
    def batch_size(self) -> int:
        """N, the number of samples conditioned."""
        return self._size

    @property
    def device(self) -> torch.device:
        """Device of the first tensor (CPU for a bundle without tensors)."""
        return next(iter(self._tensors.values())).device if self._tensors else torch.device("cpu")

    def select(self, index: torch.Tensor | slice) -> Conditioning:
        """Rows ``index`` of every tensor."""
        rows = torch.arange(self._size, device=index.device if isinstance(index, torch.Tensor) else "cpu")
        size = int(rows[index].numel())
        return Conditioning({name: t[index] for name, t in self._tensors.items()}, size)

    def to(self, device: torch.device | str) -> Conditioning:
        """Every tensor on ``device``."""
        return Conditioning({name: t.to(device) for name, t in self._tensors.items()}, self._size)

    def where(self, mask: torch.Tensor, other: Conditioning) -> Conditioning:
        """Rows of ``other`` where ``mask`` (N,) is True, rows of ``self`` elsewhere; names as in ``self``."""
        out = {}
        for name, t in self._tensors.items():
            m = mask.to(t.device).view(-1, *([1] * (t.ndim - 1)))
            out[name] = torch.where(m, other[name].to(t.device), t)
        return Conditioning(out, self._size)

    def spread(self, count: int) -> Conditioning:
        """``count`` rows spread evenly over the bundle (all rows when it has fewer), in order."""
        index = torch.linspace(0, self._size - 1, min(count, self._size)).round().long().unique()
        return self.select(index)

    def distinct(self) -> Conditioning:
        """The distinct rows, in sorted order (for class labels: each label once, ascending)."""
        if self._size == 0:
            return self
        if not self._tensors:  # every row is the same (empty) condition
            return self.select(slice(0, 1))
        flat = torch.cat([t.reshape(self._size, -1).double() for t in self._tensors.values()], dim=1)
        _, inverse = torch.unique(flat, dim=0, return_inverse=True)  # (N,) index of each row's distinct value
        rows = torch.arange(self._size, device=inverse.device)
        first = torch.full((int(inverse.max()) + 1,), self._size, dtype=torch.long, device=inverse.device)
        first.scatter_reduce_(0, inverse, rows, reduce="amin")
        return self.select(first)

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Concatenate bundles with the same names (in any order; the first's order is kept) along the
        batch dimension."""
        if not parts:
            raise ValueError("nothing to concatenate: give at least one Conditioning")
        names = list(parts[0])
        if any(set(p) != set(names) for p in parts):
            raise ValueError(
                f"cannot concatenate conditioning with different names: {[list(p) for p in parts]}"
            )
        size = sum(p.batch_size for p in parts)
        return Conditioning({name: torch.cat([p[name] for p in parts]) for name in names}, size)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}: {tuple(t.shape)}" for name, t in self._tensors.items())
        return f"Conditioning({shapes or f'no tensors, batch {self._size}'})"
