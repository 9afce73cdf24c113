"""The Diff-Tuning objective (docs/method.md §2): per-sample terms of one forward pass, reduced by the caller.

    loss = mean_{target} l(x, t ~ psi) + lambda * mean_{bank} l(x, t ~ xi)

with l = epsilon-MSE (in the model's parameterisation) + the variational-bound term for models that
learn their variance. Plain fine-tuning (uniform psi, no bank), retention only (uniform psi + bank)
and reconsolidation only (psi, no bank) are configurations of this one objective, not separate code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from difftune.objectives.base import Draw, LossTerms
from difftune.objectives.variational_bound import VariationalBound
from difftune.schedules.base import TimestepSchedule

if TYPE_CHECKING:
    from difftune.backbones.conditioning import Conditioning
    from difftune.process import ForwardProcess

REALISATIONS = ("sample", "weight")


class DiffTuningLoss:
    """Retention + reconsolidation denoising loss over one concatenated batch.

    Args:
        process: the model's forward process (:func:`difftune.process.build_process`): noising, the
            regression target, x0 from a prediction.
        target_schedule: psi, the target stream's timestep schedule.
        bank_schedule: xi, the bank stream's timestep schedule.
        realisation: ``"sample"`` (t ~ schedule, unit weight) or ``"weight"`` (uniform t, loss times
            ``T * p(t)``).
        bank_weight: lambda.
        cfg_dropout: probability of dropping a target sample's condition (classifier-free guidance).
        learn_variance: add the variational-bound term ``vb``, for a model that predicts its variance
            (``Backbone.learns_variance``: its output has 2C channels). :func:`~difftune.objectives.build_objective`
            sets it from the backbone's declaration.

    Raises:
        ValueError: the schedules have another T than the process, or ``learn_variance`` is set on a
            process without a variance term.
    """

    def __init__(
        self,
        process: ForwardProcess,
        target_schedule: TimestepSchedule,
        bank_schedule: TimestepSchedule,
        realisation: str = "sample",
        bank_weight: float = 0.1,
        cfg_dropout: float = 0.1,
        learn_variance: bool = False,
    ) -> None:
        if realisation not in REALISATIONS:
            raise ValueError(f"realisation={realisation!r}: use 'sample' or 'weight'")
        T = process.num_timesteps
        if target_schedule.num_timesteps != T or bank_schedule.num_timesteps != T:
            raise ValueError(f"schedules must have T={T} timesteps like the forward process")
        if learn_variance and not process.has_variance_term:
            raise ValueError(f"learn_variance: the {process.name} process has no variance term")
        self.process = process
        self.schedules = (target_schedule, bank_schedule)
        self.realisation = realisation
        self.bank_weight = bank_weight
        self.cfg_dropout = cfg_dropout
        self.learn_variance = learn_variance
        self.vb = VariationalBound(process.betas) if learn_variance else None
        self.num_timesteps = T

    def draw(self, n_target: int, n_bank: int, shape: tuple[int, ...], generator: torch.Generator) -> Draw:
        """Draw t, noise and the guidance drop for ``n_target`` target then ``n_bank`` bank samples."""
        sampled = self.realisation == "sample"
        uniform = lambda n: torch.randint(0, self.num_timesteps, (n,), generator=generator)  # noqa: E731
        t_target = self.schedules[0].sample(n_target, generator) if sampled else uniform(n_target)
        t_bank = self.schedules[1].sample(n_bank, generator) if sampled else uniform(n_bank)
        noise = torch.randn((n_target + n_bank, *shape), generator=generator)
        drop = torch.rand(n_target + n_bank, generator=generator) < self.cfg_dropout
        drop[n_target:] = False
        return Draw(torch.cat([t_target, t_bank]), noise, drop, torch.arange(n_target + n_bank) >= n_target)

    def __call__(
        self, model: torch.nn.Module, x0: torch.Tensor, cond: Conditioning, is_bank: torch.Tensor, draw: Draw
    ) -> LossTerms:
        """Per-sample terms for one forward pass over target and bank samples together.

        Args:
            model: a :class:`~difftune.backbones.Backbone` (possibly wrapped by DDP).
            x0: clean samples (N, C, H, W).
            cond: their conditions, guidance drop already applied (N).
            is_bank: (N,) bool.
            draw: this batch's random draws (see :meth:`draw`).
        """
        x_t, t, noise = self.noised(x0, draw)
        out = self.predict(model, x_t, t, cond)  # (N, C or 2C, H, W)
        terms = self.denoising_terms(out, x0, x_t, noise, t)
        return self.weighted(terms, t, is_bank)

    def noised(self, x0: torch.Tensor, draw: Draw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, t, noise)`` on ``x0``'s device: the forward process at the drawn timesteps."""
        device = x0.device
        t, noise = draw.t.to(device), draw.noise.to(device=device, dtype=x0.dtype)
        return self.process.noised(x0, noise, t), t, noise

    def predict(
        self, model: Callable[..., torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The model's raw output (N, C or 2C, H, W) for ``x_t`` at indices ``t``, given what the process feeds it."""
        return model(*self.process.model_input(x_t, t), cond)

    def denoising_terms(
        self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sample ``mse`` (in the model's parameterisation) and, for a variance-learning model, ``vb``."""
        C = x0.shape[1]
        pred = out[:, :C]
        target = self.process.target(x0, noise, t)
        terms = {"mse": (pred.float() - target.float()).pow(2).flatten(1).mean(1)}  # (N,)
        if self.learn_variance:
            if out.shape[1] != 2 * C:
                raise ValueError(
                    f"learn_variance is set but the model returns {out.shape[1]} channels for {C}-channel "
                    "samples; the variance term needs 2C (set it from Backbone.learns_variance)"
                )
            pred_x0 = self.process.x0(pred.detach().float(), x_t.float(), t)
            terms["vb"] = self.vb(x0, x_t, t, pred_x0, out[:, C:])  # trains the variance channels only
        return terms

    def weighted(self, terms: dict[str, torch.Tensor], t: torch.Tensor, is_bank: torch.Tensor) -> LossTerms:
        """The terms' sum as the per-sample loss (times the schedule weight under ``"weight"``)."""
        loss = sum(terms.values(), torch.zeros_like(t, dtype=torch.float32))
        if self.realisation == "weight":
            weight = torch.where(is_bank, self.schedules[1].loss_weight(t), self.schedules[0].loss_weight(t))
            loss = loss * weight
        return LossTerms(loss=loss, t=t, is_bank=is_bank, terms={k: v.detach() for k, v in terms.items()})

    def reduce(
        self, terms: LossTerms, n_target: int, n_bank: int, bank_weight: float | None = None
    ) -> torch.Tensor:
        """sum(target losses) / n_target + lambda * sum(bank losses) / n_bank.

        ``n_target`` and ``n_bank`` are the step's global counts, so that sums over processes and
        accumulation micro-steps add up to the global means exactly; ``bank_weight`` is the step's
        lambda (``None``: :attr:`bank_weight`; ``objective.bank_curriculum.scale_weight`` varies it).
        """
        weight = self.bank_weight if bank_weight is None else bank_weight
        zero = torch.zeros_like(terms.loss)
        # torch.where, not boolean indexing: no host synchronisation between forward and backward
        total = torch.where(terms.is_bank, zero, terms.loss).sum() / max(n_target, 1)
        if n_bank > 0:
            total = total + weight * torch.where(terms.is_bank, terms.loss, zero).sum() / n_bank
        return total
