"""Data-driven ψ and ξ (docs/method.md §10): schedules set from the pre-trained model's transfer gap.

Before fine-tuning, the frozen pre-trained model's denoising loss is measured per bin of t on the
target data, L_target(b), and on its own samples (the knowledge bank), L_bank(b), with the same t
and noise for both sets. The gap g(b) = log(L_target(b) / L_bank(b)) says how much worse the model
does on the target than on what it already knows. With g⁺ = max(g, 0), G = max_b g⁺(b) and the
floor δ = 0.1·max(G, 1) (every t keeps some mass):

    ψ(b) ∝ g⁺(b) + δ          (re-learn where the gap is large: reconsolidation)
    ξ(b) ∝ G − g⁺(b) + δ      (retain where the knowledge transfers: retention)

both normalised to mean 1 over t and piecewise constant over the bins
(:func:`~difftune.schedules.base.tabulated`). The floor's scale 1 (a loss ratio of e) makes a small gap
shape the schedules only in proportion: the largest over the smallest weight is 1 + G/δ, at most
11 (G ≥ 1), and 1.5 for G = 0.05, which may well be noise. Where no bin has a positive gap, both are
uniform (a warning says so); where the largest gap is within two standard errors (over the draws) of
zero, a warning says the shape may be noise.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.errors import UserError
from difftune.io.atomic import atomic_write_json
from difftune.process import build_process
from difftune.schedules.base import timestep_bins
from difftune.schedules.binned_loss import Evaluation, binned_denoising_loss

logger = logging.getLogger(__name__)
FLOOR = 0.1  # δ = FLOOR · max(G, GAP_SCALE): the least raw weight of a bin
GAP_SCALE = 1.0  # below this largest gap (a loss ratio of e), the schedules are shaped in proportion to it
TINY = 1e-12  # added to both losses before the log: a model exact on both sets has gap 0, not NaN


@dataclass(frozen=True)
class DataSchedule:
    """A fitted pair of schedules, per bin of t, and what the fit measured and cost.

    Attributes:
        num_timesteps: T of the model's noise schedule.
        t_low, t_high: the first and last timestep of each bin.
        loss_target, loss_bank: the pre-trained model's mean denoising MSE per bin on each set.
        gap: log(loss_target / loss_bank) per bin.
        gap_se: its standard error per bin, from the spread over the draws (``None`` with one draw).
        psi, xi: the target and bank weights per bin (mean 1 over t).
        uniform: no bin had a positive gap, so ψ and ξ are uniform.
        prediction_type: what the loss compared the model's output with (``epsilon``, ...).
        draws_per_bin: forward passes per bin and per set.
        rows_per_draw: samples per forward pass.
        forward_passes: model calls of the fit, both sets together.
        seconds: wall-clock time of the fit.
        seed: seed of the fit's timesteps and noise.
    """

    num_timesteps: int
    t_low: list[int]
    t_high: list[int]
    loss_target: list[float]
    loss_bank: list[float]
    gap: list[float]
    gap_se: list[float] | None
    psi: list[float]
    xi: list[float]
    uniform: bool
    prediction_type: str
    draws_per_bin: int
    rows_per_draw: int
    forward_passes: int
    seconds: float
    seed: int

    @property
    def num_bins(self) -> int:
        """Number of bins of t."""
        return len(self.psi)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (floats written exactly: a loaded fit equals the fitted one)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "the fit") -> DataSchedule:
        """Rebuild a saved fit; refuse one that is incomplete or does not tile t into its bins.

        Raises:
            UserError: missing keys, lists of different lengths, bins that are not those of
                :func:`~difftune.schedules.base.timestep_bins`, or a weight that is not positive.
        """
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in raw]
        if missing:
            raise UserError(
                f"{source} lacks {', '.join(missing)}; start a fresh run to fit the schedules again"
            )
        fit = cls(**{name: raw[name] for name in names})
        edges = timestep_bins(fit.num_timesteps, fit.num_bins).tolist()
        per_bin = [fit.t_low, fit.t_high, fit.loss_target, fit.loss_bank, fit.gap, fit.psi, fit.xi]
        per_bin += [] if fit.gap_se is None else [fit.gap_se]
        if (
            any(len(values) != fit.num_bins for values in per_bin)
            or fit.t_low != edges[:-1]
            or fit.t_high != [e - 1 for e in edges[1:]]
            or not all(w > 0 and math.isfinite(w) for w in fit.psi + fit.xi)
        ):
            raise UserError(
                f"{source} is damaged (bins or weights); start a fresh run to fit the schedules again"
            )
        return fit

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the fit as JSON, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DataSchedule:
        """Read a fit written by :meth:`save`.

        Raises:
            UserError: the file is missing, not JSON, or damaged.
        """
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise UserError(
                f"cannot read the fitted schedules {path} ({err}); start a fresh run to fit them again"
            ) from None
        return cls.from_dict(raw, str(path))

    def summary(self) -> str:
        """One line: where ψ and ξ put their mass, and the cost of the fit."""
        if self.uniform:
            shape = "no transfer gap measured, ψ and ξ uniform"
        else:
            top = max(range(self.num_bins), key=self.psi.__getitem__)
            low = max(range(self.num_bins), key=self.xi.__getitem__)
            se = f" ± {self.gap_se[top]:.3f}" if self.gap_se else ""
            shape = (
                f"largest gap log(L_target/L_bank) = {self.gap[top]:.3f}{se} at t {self.t_low[top]}-{self.t_high[top]}, "
                f"ψ peaks there ({self.psi[top]:.2f}), ξ at t {self.t_low[low]}-{self.t_high[low]} ({self.xi[low]:.2f})"
            )
        return (
            f"data-driven schedules over {self.num_bins} bins of t: {shape}; fit cost {self.forward_passes} forward "
            f"passes of {self.rows_per_draw} samples, {self.seconds:.1f} s"
        )


def log_ratio(loss_target: torch.Tensor, loss_bank: torch.Tensor) -> torch.Tensor:
    """The gap log(L_target / L_bank), elementwise; 0 where both losses are 0."""
    return ((loss_target + TINY) / (loss_bank + TINY)).log()


def gap_densities(gap: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """ψ and ξ per bin from the gap per bin (see the module docstring), each with mean 1 over t.

    Args:
        gap: g(b), (B,).
        widths: timesteps in each bin (B,); the mean over t weighs each bin by its width.

    Returns:
        ``(psi, xi, uniform)``, float64 (B,); ``uniform`` is True when no bin has a positive gap.
    """
    positive = gap.double().clamp(min=0.0)
    largest = float(positive.max())
    if not largest > 0.0:
        ones = torch.ones_like(positive)
        return ones, ones.clone(), True
    floor = FLOOR * max(largest, GAP_SCALE)
    widths = widths.double()

    def mean_one(raw: torch.Tensor) -> torch.Tensor:
        return raw * widths.sum() / (raw * widths).sum()

    return mean_one(positive + floor), mean_one(largest - positive + floor), False


def fit_data_schedule(
    backbone: Backbone,
    scheduler_config: Any,
    target_x0: torch.Tensor,
    target_cond: Conditioning,
    bank_x0: torch.Tensor,
    bank_cond: Conditioning,
    num_bins: int = 20,
    draws_per_bin: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> DataSchedule:
    """Fit ψ and ξ to the transfer gap of the pre-trained ``backbone`` (docs/method.md §10).

    The model runs in eval mode without gradients (its mode is restored). Each forward pass takes
    ``min(batch_size, len(target), len(bank))`` samples of one set; row i of the target pass and
    row i of the bank pass share t and noise.

    Args:
        backbone: the pre-trained model (for a tuned model: with its adapters switched off).
        scheduler_config: its noise schedule (a diffusers scheduler config, or a scheduler): any forward
            process (DDPM, rectified flow, EDM; :func:`~difftune.process.build_process`).
        target_x0, target_cond: target samples in the diffusion space (N, C, H, W) and the
            conditions training gives them.
        bank_x0, bank_cond: bank samples (M, C, H, W) and the conditions training gives them
            (the unconditional form for ``bank.condition: null``: ``backbone.drop(cond, all True)``).
        num_bins: bins of t.
        draws_per_bin: forward passes per bin and per set.
        seed: seed of the timesteps and the noise.
        batch_size: the most samples per forward pass.
        device: where the model runs.

    Raises:
        UserError: an empty set, or more bins than timesteps.
    """
    if hasattr(scheduler_config, "config"):  # a scheduler: its config does not name its class
        scheduler_config = {"_class_name": type(scheduler_config).__name__, **scheduler_config.config}
    process = build_process(scheduler_config, tuple(target_x0.shape[1:]))
    if len(target_x0) == 0 or len(bank_x0) == 0:
        raise UserError(
            "a data-driven schedule needs target samples and bank samples; neither set may be empty"
        )
    rows = min(batch_size, len(target_x0), len(bank_x0))
    was_training = backbone.training
    backbone.eval()
    try:
        measured = binned_denoising_loss(
            (Evaluation(backbone, target_x0, target_cond), Evaluation(backbone, bank_x0, bank_cond)),
            scheduler_config,
            num_bins,
            draws_per_bin,
            seed,
            batch_size=rows,
            device=device,
            rows_per_draw=rows,
            desc="data-driven schedule",
        )
    finally:
        backbone.train(was_training)
    loss_target, loss_bank = measured.losses.unbind(1)
    gap = log_ratio(loss_target, loss_bank)
    gap_se = None
    if draws_per_bin > 1:  # approximate: the spread of the per-draw log ratios
        gap_se = log_ratio(*measured.per_draw.unbind(2)).std(dim=1) / math.sqrt(draws_per_bin)
    psi, xi, uniform = gap_densities(gap, measured.edges.diff())
    top = int(gap.argmax())
    if uniform:
        logger.warning(
            "no transfer gap: the pre-trained model does as well on the target data as on its own samples at "
            "every t (largest log ratio %.3g), so the data-driven ψ and ξ are uniform",
            float(gap[top]),
        )
    elif gap_se is not None and gap[top] < 2 * gap_se[top]:
        logger.warning(
            "the largest transfer gap (%.3g at t %d-%d) is within two standard errors (%.3g) of zero: the shape "
            "of the data-driven ψ and ξ may be noise; more draws per bin (objective.data_driven.draws) tell",
            float(gap[top]),
            int(measured.edges[top]),
            int(measured.edges[top + 1]) - 1,
            float(gap_se[top]),
        )
    edges = measured.edges.tolist()
    return DataSchedule(
        num_timesteps=process.num_timesteps,
        t_low=edges[:-1],
        t_high=[e - 1 for e in edges[1:]],
        loss_target=loss_target.tolist(),
        loss_bank=loss_bank.tolist(),
        gap=gap.tolist(),
        gap_se=None if gap_se is None else gap_se.tolist(),
        psi=psi.tolist(),
        xi=xi.tolist(),
        uniform=uniform,
        prediction_type=process.prediction_type,
        draws_per_bin=draws_per_bin,
        rows_per_draw=rows,
        forward_passes=measured.forward_passes,
        seconds=measured.seconds,
        seed=seed,
    )
