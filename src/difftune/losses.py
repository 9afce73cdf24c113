"""The Diff-Tuning objective (paper-notes §2): per-sample terms, one forward pass, reduced by the caller.

    loss = mean_{target} l(x, t ~ psi) + lambda * mean_{bank} l(x, t ~ xi)

Plain fine-tuning (uniform psi, no bank), retention only (uniform psi + bank) and reconsolidation
only (psi, no bank) are configurations of this one loss, not separate code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from difftune.schedules import TimestepSchedule
from difftune.variational_bound import VariationalBound


@dataclass
class Draw:
    """Everything random about one batch, drawn once for the global batch and sliced per process.

    Attributes:
        t: integer timesteps (N,).
        noise: Gaussian noise (N, C, H, W).
        drop: True where a target label is replaced by the null label (N,) (always False for bank).
    """

    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor

    def __getitem__(self, index: torch.Tensor | slice) -> Draw:
        return Draw(self.t[index], self.noise[index], self.drop[index])


@dataclass
class LossTerms:
    """Unreduced result of :class:`DiffTuningLoss`. All tensors have shape (N,).

    Attributes:
        loss: per-sample loss, including the schedule weight under the ``weight`` realisation.
        raw: per-sample loss without that weight (for logging per range of t).
        t: the timesteps used.
        is_bank: True for bank (retention) samples, False for target (reconsolidation) samples.
    """

    loss: torch.Tensor
    raw: torch.Tensor
    t: torch.Tensor
    is_bank: torch.Tensor


class DiffTuningLoss:
    """Retention + reconsolidation denoising loss over one concatenated batch.

    Args:
        scheduler: a DDPM scheduler carrying the model's noise schedule and ``prediction_type``.
        target_schedule: psi, the target stream's timestep schedule.
        bank_schedule: xi, the bank stream's timestep schedule.
        realisation: ``"sample"`` (t ~ schedule, unit weight) or ``"weight"`` (uniform t, loss times
            ``T * p(t)``).
        bank_weight: lambda.
        cfg_dropout: probability of routing a target sample to the null label.
        learn_variance: add the variational-bound term for models that predict variance.
    """

    def __init__(
        self,
        scheduler: DDPMScheduler,
        target_schedule: TimestepSchedule,
        bank_schedule: TimestepSchedule,
        realisation: str = "sample",
        bank_weight: float = 0.1,
        cfg_dropout: float = 0.1,
        learn_variance: bool = True,
    ) -> None:
        if realisation not in ("sample", "weight"):
            raise ValueError(f"realisation={realisation!r}: use 'sample' or 'weight'")
        T = scheduler.config.num_train_timesteps
        if target_schedule.num_timesteps != T or bank_schedule.num_timesteps != T:
            raise ValueError(f"schedules must have T={T} timesteps like the noise scheduler")
        self.scheduler = scheduler
        self.schedules = (target_schedule, bank_schedule)
        self.realisation = realisation
        self.bank_weight = bank_weight
        self.cfg_dropout = cfg_dropout
        self.learn_variance = learn_variance
        self.prediction_type = scheduler.config.prediction_type
        self.vb = VariationalBound(scheduler.betas)
        self.abar = scheduler.alphas_cumprod.float()
        self.num_timesteps = T

    def draw(self, n_target: int, n_bank: int, shape: tuple[int, ...], generator: torch.Generator) -> Draw:
        """Draw t, noise and label dropout for ``n_target`` target then ``n_bank`` bank samples."""
        sampled = self.realisation == "sample"
        uniform = lambda n: torch.randint(0, self.num_timesteps, (n,), generator=generator)  # noqa: E731
        t_target = self.schedules[0].sample(n_target, generator) if sampled else uniform(n_target)
        t_bank = self.schedules[1].sample(n_bank, generator) if sampled else uniform(n_bank)
        noise = torch.randn((n_target + n_bank, *shape), generator=generator)
        drop = torch.rand(n_target + n_bank, generator=generator) < self.cfg_dropout
        drop[n_target:] = False
        return Draw(torch.cat([t_target, t_bank]), noise, drop)

    def _x0_from_output(self, out: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
        if self.prediction_type == "v_prediction":
            return abar.sqrt() * x_t - (1 - abar).sqrt() * out
        return out

    def __call__(
        self,
        model: torch.nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor,
        is_bank: torch.Tensor,
        draw: Draw,
        null_label: int,
    ) -> LossTerms:
        """Per-sample loss terms for one forward pass over target and bank samples together.

        Args:
            model: a :class:`~difftune.backbones.Backbone` (possibly wrapped by DDP).
            x0: clean samples (N, C, H, W).
            labels: class labels (N,); ignored for bank samples, which go to ``null_label``.
            is_bank: (N,) bool.
            draw: this batch's random draws (see :meth:`draw`).
            null_label: the model's unconditional label id.
        """
        device = x0.device
        t, noise = draw.t.to(device), draw.noise.to(device=device, dtype=x0.dtype)
        routed = torch.where(is_bank | draw.drop.to(device), torch.full_like(labels, null_label), labels)
        x_t = self.scheduler.add_noise(x0, noise, t)
        out = model(x_t, t, routed)  # (N, C or 2C, H, W)
        C = x0.shape[1]
        pred = out[:, :C]
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        raw = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (N,)
        if out.shape[1] == 2 * C and self.learn_variance:
            if self.abar.device != device:
                self.abar = self.abar.to(device)
            abar = self.abar[t].view(-1, *([1] * (x0.ndim - 1)))
            pred_x0 = self._x0_from_output(pred.detach().float(), x_t.float(), abar)
            raw = raw + self.vb(x0, x_t, t, pred_x0, out[:, C:])
        loss = raw
        if self.realisation == "weight":
            weight = torch.where(is_bank, self.schedules[1].loss_weight(t), self.schedules[0].loss_weight(t))
            loss = raw * weight
        return LossTerms(loss=loss, raw=raw.detach(), t=t, is_bank=is_bank)

    def reduce(self, terms: LossTerms, n_target: int, n_bank: int) -> torch.Tensor:
        """sum(target losses) / n_target + lambda * sum(bank losses) / n_bank.

        ``n_target`` and ``n_bank`` are the global counts, so that sums over processes and
        accumulation micro-steps add up to the global means exactly.
        """
        zero = torch.zeros_like(terms.loss)
        # torch.where, not boolean indexing: no host synchronisation between forward and backward
        total = torch.where(terms.is_bank, zero, terms.loss).sum() / max(n_target, 1)
        if n_bank > 0:
            total = total + self.bank_weight * torch.where(terms.is_bank, terms.loss, zero).sum() / n_bank
        return total
