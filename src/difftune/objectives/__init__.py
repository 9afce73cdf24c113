"""Objectives: draw the batch's randomness, compute named per-sample terms, reduce them.

``objective.kind`` in the config picks a builder from :data:`OBJECTIVES`; :func:`build_objective`
is the one place the trainer gets its objective from. A new objective (e.g. a distillation variant
of retention) is a new module here implementing :class:`~difftune.objectives.base.Objective`, plus
one registry entry; its terms are logged without further code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from difftune.errors import UserError
from difftune.objectives.base import Draw, LossTerms, Objective
from difftune.objectives.diff_tuning import DiffTuningLoss
from difftune.schedules import build_schedule

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from difftune.backbones.base import Backbone
    from difftune.config import ObjectiveConfig


def _diff_tuning(cfg: ObjectiveConfig, scheduler: DDPMScheduler, backbone: Backbone) -> DiffTuningLoss:
    T = scheduler.config.num_train_timesteps
    return DiffTuningLoss(
        scheduler,
        build_schedule(cfg.target_schedule, T, cfg.target_exponent),
        build_schedule(cfg.bank_schedule, T, cfg.bank_exponent),
        realisation=cfg.realisation,
        bank_weight=cfg.bank_weight,
        cfg_dropout=cfg.cfg_dropout,
        # the variance term follows what the backbone declares, not the shape of its output
        learn_variance=cfg.learn_variance and backbone.learns_variance,
    )


OBJECTIVES: dict[str, Callable[[ObjectiveConfig, DDPMScheduler, Backbone], Objective]] = {
    "diff_tuning": _diff_tuning,
}


def build_objective(cfg: ObjectiveConfig, scheduler: DDPMScheduler, backbone: Backbone) -> Objective:
    """The objective ``cfg.kind`` for ``backbone`` under the noise schedule of ``scheduler``.

    Raises:
        ValueError: unknown kind; the message lists the valid ones.
    """
    if cfg.kind not in OBJECTIVES:
        raise UserError(f"objective.kind={cfg.kind!r} is unknown; valid: {sorted(OBJECTIVES)}")
    return OBJECTIVES[cfg.kind](cfg, scheduler, backbone)


__all__ = ["OBJECTIVES", "DiffTuningLoss", "Draw", "LossTerms", "Objective", "build_objective"]
