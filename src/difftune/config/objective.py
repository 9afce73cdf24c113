"""The ``objective`` section of the experiment config: the loss, its two streams and their schedules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from difftune.config.checks import _check, _check_fields
from difftune.config.names import (
    FITTED_SCHEDULE_NAMES,
    ObjectiveKind,
    ScheduleAxis,
    is_schedule_name,
    schedule_names,
)


@dataclass
class DistillationSettings:
    """``objective.distillation``: settings that only ``kind: distillation`` reads.

    Attributes:
        teacher: where the pre-trained model's predictions come from: ``copy`` (computed each step:
            a frozen copy under full fine-tuning, the adapters switched off otherwise) or ``stored``
            (made with the bank by ``difftune bank``: ``stored_draws`` draws of (t, noise) per bank
            sample and the prediction at each; no teacher in training, docs/method.md §7).
        stored_draws: K, the draws stored per bank sample with ``teacher: stored``; must be >= 1.
        teacher_dtype: with full fine-tuning the teacher is a frozen copy of the pre-trained model,
            in ``float32`` or ``bfloat16`` (half the memory); parameter-efficient methods need no
            copy (their adapters are switched off instead).
    """

    teacher: Literal["copy", "stored"] = "copy"
    stored_draws: int = 4
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        _check_fields(self, "objective.distillation")
        _check(
            self.stored_draws >= 1, f"objective.distillation.stored_draws={self.stored_draws} must be >= 1"
        )


POWER_SCHEDULES = ("power_up", "power_down")  # they read objective.<name>.exponent and objective.power.axis
LOGIT_NORMAL_SCHEDULES = ("logit_normal_up", "logit_normal_down")  # they read objective.<name>.offset


@dataclass
class PowerSchedule:
    """``objective.power_up`` / ``objective.power_down``: ψ(t) ∝ ((t + 1) / T)^s and ξ(t) ∝ (1 − t / T)^s.

    Attributes:
        exponent: the exponent s (paper default 1; 0 is uniform); must be >= 0.
    """

    exponent: float = 1.0


@dataclass
class PowerAxis:
    """``objective.power``: how both power schedules travel to the model's process.

    Attributes:
        axis: ``"auto"`` (the default: the port recommended for the model's process,
            :data:`difftune.schedules.ports.RECOMMENDED_AXIS`), ``"index"`` (the paper's: a power law over
            the normalised index (t + 1) / T), ``"log_snr"`` (the DDPM-linear power law carried over to
            the model's process by matching log-SNR) or ``"offsets"`` (the model's pre-training density
            moved by ``logit_normal_up/down.offset``); docs/method.md §12. ``uniform`` stays uniform.
    """

    axis: ScheduleAxis = "auto"


@dataclass
class MinSNRSchedule:
    """``objective.min_snr``: min-SNR-γ, the weighting min(SNR, γ) / SNR (Hang et al. 2023).

    Attributes:
        gamma: γ (Hang et al. use 5); must be > 0.
    """

    gamma: float = 5.0


@dataclass
class LogitNormalSchedule:
    """``objective.logit_normal_up`` / ``objective.logit_normal_down``: the model's pre-training
    density, moved toward noise (``_up``) or toward data (``_down``; docs/method.md §12).

    Attributes:
        offset: the shift, in logit(σ_flow) = −log-SNR / 2 units; must be >= 0 (the name gives the direction).
    """

    offset: float = 1.1


@dataclass
class DataDrivenSchedule:
    """``objective.data_driven``: ψ and ξ fitted from the pre-trained model's transfer gap (docs/method.md §10).

    Attributes:
        bins: bins of t the schedule is measured and tabulated over.
        draws: forward passes per bin and per set (target, bank) of its fit, each on up to
            ``train.batch_size // train.gradient_accumulation`` samples.
    """

    bins: int = 20
    draws: int = 8


@dataclass
class BankCurriculum:
    """``objective.bank_curriculum``: the bank's share of each step's batch over training.

    Step k counts from 0 (optimiser step k + 1, logged as step k + 1), as the learning rate's
    schedule does. The share of step k is 0 before ``start_step``; rises linearly from 0 at
    ``start_step`` to ``bank_share`` at ``start_step + warmup_steps`` (the learning rate's warm-up
    line); holds ``bank_share``; over the ``anneal_steps`` steps before ``end_step`` falls linearly
    from ``bank_share`` toward ``final_share`` (the line's value at ``end_step``); and is 0 from
    ``end_step`` on: those batches are all target samples. Step k draws int(share(k) * B) bank
    samples. The defaults give today's constant share.

    Attributes:
        start_step: the first step that can draw bank samples (>= 0).
        warmup_steps: steps of the linear ramp from 0 to ``bank_share`` (0: none).
        end_step: the first step without bank samples; ``None``: the bank is used to the end.
        anneal_steps: steps of the linear fall before ``end_step`` (0: none; needs ``end_step``).
        final_share: where the fall heads, in [0, ``bank_share``].
        scale_weight: also scale ``bank_weight`` by share(k) / ``bank_share``.
    """

    start_step: int = 0
    warmup_steps: int = 0
    end_step: int | None = None
    anneal_steps: int = 0
    final_share: float = 0.0
    scale_weight: bool = False


def _check_curriculum(c: BankCurriculum, bank_share: float) -> None:
    """Refuse an ``objective.bank_curriculum`` that is negative, out of order or has no share to shape."""
    key = "objective.bank_curriculum"
    _check(
        c == BankCurriculum() or bank_share > 0,
        f"{key} shapes the bank's share, and objective.bank_share=0 gives it none; set "
        f"objective.bank_share > 0 or leave {key} out",
    )
    for name in ("start_step", "warmup_steps", "anneal_steps", "end_step"):
        value = getattr(c, name)
        _check(value is None or value >= 0, f"{key}.{name}={value} must be >= 0")
    _check(
        0.0 <= c.final_share <= bank_share,
        f"{key}.final_share={c.final_share} must be in [0, objective.bank_share={bank_share}]",
    )
    _check(
        c.end_step is not None or c.anneal_steps == 0,
        f"{key}.anneal_steps={c.anneal_steps} ends at end_step, which is null; set {key}.end_step",
    )
    if c.end_step is not None:
        _check(
            c.end_step > c.start_step,
            f"{key}.end_step={c.end_step} must be after start_step={c.start_step}",
        )
        _check(
            c.start_step + c.warmup_steps <= c.end_step - c.anneal_steps,
            f"{key}: the warm-up (start_step + warmup_steps = {c.start_step + c.warmup_steps}) must end "
            f"before the anneal starts (end_step - anneal_steps = {c.end_step - c.anneal_steps})",
        )


# objective.<sub-section> -> (its setting, the rule, its test): checked with the sub-section's own key
_RULES = {
    "power_up": ("exponent", ">= 0", lambda v: v >= 0),
    "power_down": ("exponent", ">= 0", lambda v: v >= 0),
    "min_snr": ("gamma", "> 0", lambda v: v > 0),
    "logit_normal_up": ("offset", ">= 0 (the name gives the direction)", lambda v: v >= 0),
    "logit_normal_down": ("offset", ">= 0 (logit_normal_down shifts by -offset)", lambda v: v >= 0),
}


@dataclass
class ObjectiveConfig:
    """The Diff-Tuning objective (docs/method.md §2).

    ``loss = mean(target terms) + bank_weight * mean(bank terms)``; target timesteps follow
    ``target_schedule``, bank timesteps ``bank_schedule``. Plain fine-tuning is
    ``target_schedule: uniform, bank_share: 0``. A schedule's settings are the sub-section named
    after it (``power_up: {exponent: 1.0}``), read by whichever stream uses that schedule.

    Attributes:
        kind: the objective (a name in :data:`difftune.config.names.OBJECTIVE_NAMES`).
        target_schedule: schedule name for the target (reconsolidation) stream, e.g. ``"power_up"``
            (psi(t) grows with t), ``"uniform"``, or the weightings of other methods ``"min_snr"``
            (min-SNR-γ) and ``"inverse_snr"`` (x0 supervision), built from the model's noise levels,
            ``"logit_normal_up"`` (its pre-training density moved toward noise), or ``"data_driven"``:
            fitted from the pre-trained model's transfer gap before training (docs/method.md §10; needs a bank).
        bank_schedule: schedule name for the bank (retention) stream, e.g. ``"power_down"``,
            ``"logit_normal_down"`` or ``"data_driven"``.
        realisation: ``"sample"`` (importance-sample t, the authors' code) or ``"weight"`` (uniform
            t, loss multiplied by the schedule weight).
        bank_share: fraction r of the global batch taken from the bank; bank count = int(r * B).
        bank_curriculum: how that share changes over training steps (:class:`BankCurriculum`;
            by default it is constant).
        bank_weight: lambda, the weight of the retention loss (paper default 0.1).
        cfg_dropout: probability of replacing a target label by the null label (classifier-free
            guidance training), applied once per target sample.
        learn_variance: train the variance channels with the variational-bound term when the model
            predicts them (DiT); ``False`` leaves them out of the loss.
        retention_data: what the retention stream holds: ``"bank"`` (the knowledge bank) or
            ``"target"`` (target samples, with the null condition; no bank needed).
        power_up, power_down: the power schedules' exponents (:class:`PowerSchedule`).
        power: what both power schedules act on (:class:`PowerAxis`).
        min_snr: γ of ``min_snr`` (:class:`MinSNRSchedule`).
        logit_normal_up, logit_normal_down: their offsets (:class:`LogitNormalSchedule`).
        data_driven: how a ``data_driven`` schedule is fitted (:class:`DataDrivenSchedule`).
        distillation: the settings of ``kind: distillation`` (:class:`DistillationSettings`).
    """

    kind: ObjectiveKind = "diff_tuning"
    target_schedule: str = "power_up"
    bank_schedule: str = "power_down"
    realisation: Literal["sample", "weight"] = "sample"
    bank_share: float = 0.2
    bank_curriculum: BankCurriculum = field(default_factory=BankCurriculum)
    bank_weight: float = 0.1
    cfg_dropout: float = 0.1
    learn_variance: bool = True
    retention_data: Literal["bank", "target"] = "bank"
    power_up: PowerSchedule = field(default_factory=PowerSchedule)
    power_down: PowerSchedule = field(default_factory=PowerSchedule)
    power: PowerAxis = field(default_factory=PowerAxis)
    min_snr: MinSNRSchedule = field(default_factory=MinSNRSchedule)
    logit_normal_up: LogitNormalSchedule = field(default_factory=LogitNormalSchedule)
    logit_normal_down: LogitNormalSchedule = field(default_factory=LogitNormalSchedule)
    data_driven: DataDrivenSchedule = field(default_factory=DataDrivenSchedule)
    distillation: DistillationSettings = field(default_factory=DistillationSettings)

    def __post_init__(self) -> None:
        _check_fields(self, "objective")
        # each sub-section's values, with their keys (a shared class does not know them)
        for name in _SUB_SECTIONS:
            _check_fields(getattr(self, name), f"objective.{name}")
        for name, (key, rule, ok) in _RULES.items():
            value = getattr(getattr(self, name), key)
            _check(ok(value), f"objective.{name}.{key}={value} must be {rule}")
        _check(0.0 <= self.bank_share < 1.0, f"objective.bank_share={self.bank_share} must be in [0, 1)")
        _check_curriculum(self.bank_curriculum, self.bank_share)
        _check(self.bank_weight >= 0.0, f"objective.bank_weight={self.bank_weight} must be >= 0")
        _check(0.0 <= self.cfg_dropout < 1.0, f"objective.cfg_dropout={self.cfg_dropout} must be in [0, 1)")
        for key in ("target_schedule", "bank_schedule"):
            name = getattr(self, key)
            _check(
                is_schedule_name(name),
                f"objective.{key}={name!r} is unknown; valid: {schedule_names()} or 'package.module:function'",
            )
        d = self.data_driven
        _check(
            d.bins >= 1 and d.draws >= 1,
            f"objective.data_driven.bins={d.bins} and objective.data_driven.draws={d.draws} must be >= 1",
        )
        _check(
            self.kind != "distillation" or self.bank_share > 0,
            "objective.kind=distillation distils on the retention share of each batch, and "
            "objective.bank_share=0 gives it none; set objective.bank_share > 0 (with "
            f"objective.retention_data={self.retention_data} that share is "
            f"{'target images, no bank needed' if self.retention_data == 'target' else 'bank samples'}), "
            "or use objective.kind=diff_tuning",
        )
        if self.distillation.teacher == "stored":
            _check(
                self.kind == "distillation" and self.retention_data == "bank",
                "objective.distillation.teacher=stored keeps the teacher's predictions in the bank: it needs "
                f"objective.kind=distillation and objective.retention_data=bank (not kind={self.kind}, "
                f"retention_data={self.retention_data}); or use teacher=copy",
            )
            _check(
                self.bank_schedule not in FITTED_SCHEDULE_NAMES,
                "objective.distillation.teacher=stored draws the bank's t from xi when the bank is made, "
                "before a data_driven xi is fitted: choose another objective.bank_schedule or teacher=copy",
            )

    @property
    def fitted_schedules(self) -> list[str]:
        """The streams (``target_schedule``, ``bank_schedule``) whose schedule is fitted from data."""
        return [k for k in ("target_schedule", "bank_schedule") if getattr(self, k) in FITTED_SCHEDULE_NAMES]

    def exponent(self, schedule: str) -> float:
        """The exponent s of the power schedule ``schedule`` (``objective.<schedule>.exponent``); 1 for
        any other schedule, which has none."""
        return getattr(self, schedule).exponent if schedule in POWER_SCHEDULES else 1.0

    def offset(self, schedule: str) -> float:
        """The offset of the logit-normal schedule ``schedule`` (``objective.<schedule>.offset``); the
        default for any other schedule, which has none."""
        return (
            getattr(self, schedule).offset
            if schedule in LOGIT_NORMAL_SCHEDULES
            else LogitNormalSchedule.offset
        )


_SUB_SECTIONS = (
    "bank_curriculum",
    "power_up",
    "power_down",
    "power",
    "min_snr",
    "logit_normal_up",
    "logit_normal_down",
    "data_driven",
    "distillation",
)
