"""Running sums of an objective's per-sample terms for logging, per stream and quarter of t.

The per-quarter losses are the chain of forgetting seen from inside training (improved-diffusion's
per-quartile logging): target loss falling at high t and bank loss staying flat at low t is the
behaviour Diff-Tuning aims for. Whatever terms the objective returns are logged; nothing here names
them.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from difftune.objectives.base import LossTerms

STREAMS = ("target", "bank")


class TermLog:
    """Sums since the last flush: weighted loss per stream, and each unweighted term per stream and quarter.

    The sums stay on the loss's device and reach the host only in :meth:`flush`, so logging adds no
    host synchronisation to a training step.

    Args:
        num_timesteps: T, to map t to its quarter.
    """

    def __init__(self, num_timesteps: int) -> None:
        self.T = num_timesteps
        self.names: list[str] | None = (
            None  # "loss" (sum of the terms) then the terms, fixed at the first add
        )
        self.weighted = torch.zeros(2, dtype=torch.float64)  # (stream,)
        self.cells = torch.zeros(0, dtype=torch.float64)  # (names, stream, quarter, sum|count), flattened
        self.steps = 0

    def add(self, terms: LossTerms) -> None:
        """Add one micro-batch's terms."""
        if self.names is None:
            self.names = ["loss", *terms.terms]
            self.cells = torch.zeros(len(self.names) * 2 * 4 * 2, dtype=torch.float64)
        elif self.names[1:] != list(terms.terms):
            # the sums are laid out by position: a different set or order of terms would mislabel them
            raise ValueError(f"the objective returned terms {list(terms.terms)} after {self.names[1:]}")
        device = terms.loss.device
        self.weighted, self.cells = self.weighted.to(device), self.cells.to(device)
        stream = terms.is_bank.long()  # 0 target, 1 bank
        quarter = (terms.t * 4 // self.T).clamp(max=3)
        self.weighted.index_add_(0, stream, terms.loss.detach().double())
        values = torch.stack([terms.raw, *terms.terms.values()]).double()  # (names, N)
        for k in range(values.shape[0]):
            cell = ((k * 2 + stream) * 4 + quarter) * 2
            self.cells.index_add_(0, cell, values[k])
            self.cells.index_add_(0, cell + 1, torch.ones_like(values[k]))

    def flush(self, acc: Accelerator, n_target: int, n_bank: int, bank_weight: float) -> dict[str, float]:
        """Means since the last flush (summed over processes), then reset.

        Returns:
            ``loss/total``, ``loss/target``, ``loss/bank`` (weighted, per-step means), then
            ``loss_by_t/<stream>_q<1-4>`` (the sum of the terms) and ``<term>_by_t/<stream>_q<1-4>``
            for each term, unweighted, for the quarters that saw samples.
        """
        packed = torch.cat([self.weighted, self.cells])
        total = acc.reduce(packed, reduction="sum") if acc.num_processes > 1 else packed
        total = total.cpu()
        weighted = total[:2]
        steps = max(self.steps, 1)
        target = float(weighted[0]) / (n_target * steps)
        bank = float(weighted[1]) / (n_bank * steps) if n_bank else 0.0
        out = {"loss/total": target + bank_weight * bank, "loss/target": target}
        if n_bank:
            out["loss/bank"] = bank
        cells = total[2:].view(len(self.names or []), 2, 4, 2)
        for k, name in enumerate(self.names or []):
            for s, stream in enumerate(STREAMS):
                for q in range(4):
                    if cells[k, s, q, 1] > 0:
                        out[f"{name}_by_t/{stream}_q{q + 1}"] = float(cells[k, s, q, 0] / cells[k, s, q, 1])
        self.weighted.zero_()
        self.cells.zero_()
        self.steps = 0
        return out
