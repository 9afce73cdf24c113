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
        self.counted = torch.zeros(
            4, dtype=torch.float64
        )  # (finite samples per stream, non-finite per stream)
        self.t_sum = torch.zeros(2, dtype=torch.float64)  # (stream,): the sum of every sample's t
        self.cells = torch.zeros(0, dtype=torch.float64)  # (names, stream, quarter, sum|count), flattened

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
        self.counted, self.t_sum = self.counted.to(device), self.t_sum.to(device)
        stream = terms.is_bank.long()  # 0 target, 1 bank
        quarter = (terms.t * 4 // self.T).clamp(max=3)
        # a non-finite sample (a step that train.on_non_finite=skip leaves out) is counted, not averaged
        loss = terms.loss.detach().double()
        finite = torch.isfinite(loss)
        self.weighted.index_add_(0, stream, torch.where(finite, loss, 0.0))
        self.counted.index_add_(0, stream, finite.double())
        self.counted.index_add_(0, stream + 2, (~finite).double())
        self.t_sum.index_add_(0, stream, terms.t.double())
        values = torch.stack([terms.raw, *terms.terms.values()]).detach().double()  # (names, N)
        ok = torch.isfinite(values)
        values = torch.where(ok, values, 0.0)
        for k in range(values.shape[0]):
            cell = ((k * 2 + stream) * 4 + quarter) * 2
            self.cells.index_add_(0, cell, values[k])
            self.cells.index_add_(0, cell + 1, ok[k].double())

    def flush(self, acc: Accelerator, n_bank: int, bank_weight: float) -> dict[str, float]:
        """Means since the last flush (summed over processes), then reset.

        Args:
            acc: the accelerator (sums over its processes).
            n_bank: the bank stream's samples per batch at its full share (0: no bank stream).
            bank_weight: lambda in ``loss/total`` (the logged step's, with ``objective.bank_curriculum``).

        Returns:
            ``loss/total``, ``loss/target``, ``loss/bank`` (means of the weighted per-sample losses
            over the finite samples; NaN for a stream without any; ``loss/bank`` left out, and out of
            ``loss/total``, when the bank stream drew no sample since the last flush),
            ``bank/share`` (the bank's share of the samples since the last flush; with a bank stream),
            ``t_mean/<stream>`` (the mean t of each stream that drew samples), ``non_finite_samples``
            (only when some were not finite), then
            ``loss_by_t/<stream>_q<1-4>`` (the sum of the terms) and ``<term>_by_t/<stream>_q<1-4>``
            for each term, unweighted, for the quarters that saw samples.
        """
        packed = torch.cat([self.weighted, self.counted, self.t_sum, self.cells])
        total = acc.reduce(packed, reduction="sum") if acc.num_processes > 1 else packed
        total = total.cpu()
        weighted, counted, t_sum = total[:2], total[2:6], total[6:8]
        drawn = counted[:2] + counted[2:]  # samples per stream, finite or not
        target = _mean(weighted[0], counted[0])
        has_bank = bool(n_bank) and drawn[1] > 0  # a curriculum may leave the bank out of a step
        bank = _mean(weighted[1], counted[1]) if has_bank else 0.0
        out = {"loss/total": target + bank_weight * bank, "loss/target": target}
        if has_bank:
            out["loss/bank"] = bank
        if n_bank and drawn.sum() > 0:
            out["bank/share"] = float(drawn[1] / drawn.sum())
        for s, stream in enumerate(STREAMS):
            if drawn[s] > 0:
                out[f"t_mean/{stream}"] = float(t_sum[s] / drawn[s])
        if counted[2:].sum() > 0:
            out["non_finite_samples"] = float(counted[2:].sum())
        cells = total[8:].view(len(self.names or []), 2, 4, 2)
        for k, name in enumerate(self.names or []):
            for s, stream in enumerate(STREAMS):
                for q in range(4):
                    if cells[k, s, q, 1] > 0:
                        out[f"{name}_by_t/{stream}_q{q + 1}"] = float(cells[k, s, q, 0] / cells[k, s, q, 1])
        self.weighted.zero_()
        self.counted.zero_()
        self.t_sum.zero_()
        self.cells.zero_()
        return out


def _mean(weighted_sum: torch.Tensor, samples: torch.Tensor) -> float:
    """The mean of a stream's weighted per-sample losses (NaN when it had no finite sample)."""
    return float(weighted_sum) / float(samples) if samples > 0 else float("nan")
