"""Densities over a process's noise level: carry a density over one index to another through log-SNR,
optionally shifted (docs/method.md §12). One transform serves both ports that need it:

* the ``log_snr`` port of the power schedules: the paper's ψ/ξ over the index of the DDPM linear β
  schedule (β 1e-4..0.02, T = 1000), carried to the model's index so that both give the same
  distribution of λ = log SNR;
* ``logit_normal_up`` / ``logit_normal_down``: the model's own pre-training density, shifted toward
  noise or toward data by an offset in logit(σ_flow) = −λ/2 units.

The coordinate is y = sigmoid(−λ/2), the σ of the rectified flow with the same SNR: it is bounded
(a pure-noise index, λ = −∞, is y = 1), and logit(y) = −λ/2, so a shift in λ is a translation of
logit(y). Each index t owns a cell of y: from the midpoint with its lower neighbour to the midpoint
with its upper one, and half a step past the first and last index (clipped to [0, 1]). A density
over an index is its mass per cell, spread evenly over the cell in y; carrying it to another index
gives each of that index's cells the mass that falls inside it (the exact transport of this
piecewise-constant density: the continuous formula p(t') ∝ p(t(λ))·|dt/dλ|·|dλ/dt'| integrated over
the cell). On the same grid without a shift, the cells coincide and the density comes back exactly.

Beyond the range: mass that falls outside the target's cells (noisier than its noisiest index, or
cleaner than its cleanest) is dropped and the rest renormalised by the schedule, i.e. the carried
density is the source's conditioned on the noise levels the model has; the target's indices that
lie outside the source's range get no mass. Piling the outside mass onto the end index instead would
give that one index a large weight (measured in docs/method.md §12).
"""

from __future__ import annotations

import torch

from difftune.process.schedulers import linear_alphas_cumprod

REFERENCE_T = 1000  # the DDPM linear β schedule of DiT and the paper: 1e-4..0.02 over 1000 steps
CHUNK = 256  # target cells per block of the overlap computation (memory CHUNK × T)


def flow_sigma(log_snr: torch.Tensor) -> torch.Tensor:
    """y = sigmoid(−λ/2) (float64): the σ of the rectified flow with log-SNR λ; logit(y) = −λ/2."""
    return torch.sigmoid(-log_snr.double() / 2)


def reference_log_snr() -> torch.Tensor:
    """log SNR (1000,) float64 of the DDPM linear β schedule, computed as the DDPM scheduler does
    (float32 β and ᾱ), so a model with that schedule has exactly this table."""
    abar = linear_alphas_cumprod()
    return (abar / (1 - abar)).log()


def cells(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) edges (T,) of each index's cell in y (see the module docstring); y strictly increasing."""
    if y.shape[0] == 1:
        return torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    mid = (y[1:] + y[:-1]) / 2
    first = (y[0] - (y[1] - y[0]) / 2).clamp(min=0.0)
    last = (y[-1] + (y[-1] - y[-2]) / 2).clamp(max=1.0)
    return torch.cat([first.view(1), mid]), torch.cat([mid, last.view(1)])


def shift_logit(y: torch.Tensor, shift: float) -> torch.Tensor:
    """sigmoid(logit(y) + shift): 0 and 1 stay where they are."""
    if shift == 0.0:
        return y
    return torch.sigmoid(torch.logit(y) + shift)


def carry(
    probs: torch.Tensor, log_snr_from: torch.Tensor, log_snr_to: torch.Tensor, shift: float = 0.0
) -> torch.Tensor:
    """A density over one index carried to another through log-SNR: the mass (T_to,) float64 of each target index.

    Args:
        probs: masses (T_from,) over the source index.
        log_snr_from: log SNR (T_from,) of the source index, strictly decreasing.
        log_snr_to: log SNR (T_to,) of the target index, strictly decreasing.
        shift: move every noise level by ``shift`` in logit(σ_flow) = −λ/2 (positive: toward noise).

    Returns:
        Unnormalised masses: what falls outside the target's cells is dropped (module docstring).
    """
    low, high = (shift_logit(edge, shift) for edge in cells(flow_sigma(log_snr_from)))
    width = high - low
    to_low, to_high = cells(flow_sigma(log_snr_to))
    probs = probs.double()
    out = torch.zeros(to_low.shape[0], dtype=torch.float64)
    spread = width > 0
    for start in range(0, to_low.shape[0], CHUNK):
        a, b = to_low[start : start + CHUNK, None], to_high[start : start + CHUNK, None]
        overlap = (torch.minimum(b, high) - torch.maximum(a, low)).clamp(min=0.0)
        share = torch.where(spread, overlap / width.where(spread, 1.0), ((a <= low) & (low < b)).double())
        out[start : start + CHUNK] = share @ probs
    return out


def ported(reference_probs: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
    """A density over the DDPM-linear reference index (1000,) carried to a model with log-SNR ``log_snr``."""
    return carry(reference_probs, reference_log_snr(), log_snr)


def shifted(probs: torch.Tensor, log_snr: torch.Tensor, shift: float) -> torch.Tensor:
    """A density over a model's index moved by ``shift`` in logit(σ_flow) (positive: toward noise)."""
    return carry(probs, log_snr, log_snr, shift)
