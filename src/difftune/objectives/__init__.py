"""Objectives: draw the batch's randomness, compute named per-sample terms, reduce them.

``objective.kind`` in the config picks a builder from :data:`OBJECTIVES`; :func:`build_objective`
is the one place the trainer gets its objective from: ``diff_tuning`` (docs/method.md §2) or
``distillation`` (retention by distillation from the pre-trained model, §7). A new objective is a
new module here implementing :class:`~difftune.objectives.base.Objective`, plus one registry entry;
its terms are logged without further code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from difftune.errors import UserError
from difftune.lazy import lazy_exports

if TYPE_CHECKING:
    from difftune.backbones.base import Backbone
    from difftune.config.experiment import ObjectiveConfig
    from difftune.objectives.base import Objective
    from difftune.objectives.diff_tuning import DiffTuningLoss
    from difftune.objectives.distillation import DistillationLoss
    from difftune.process import ForwardProcess
    from difftune.schedules.data_driven import DataSchedule

# the module of each public name that needs torch: imported on first use, so that a config is checked
# (``objective.kind`` against :data:`OBJECTIVES`) without torch
__getattr__ = lazy_exports(
    __name__,
    {
        "Draw": "base",
        "LossTerms": "base",
        "Objective": "base",
        "DiffTuningLoss": "diff_tuning",
        "DistillationLoss": "distillation",
    },
)


def stream_schedule(cfg: ObjectiveConfig, process: ForwardProcess, name: str, fitted: Any = None) -> Any:
    """The timestep schedule ``name`` with the settings of its sub-section of ``cfg`` (resolved for
    ``process``: :func:`~difftune.schedules.ports.resolve_port`), as the objective builds it; ``fitted``
    gives a ``data_driven`` schedule its weights. Also what a bank's stored teacher draws follow (ξ)."""
    from difftune.schedules.base import build_schedule
    from difftune.schedules.ports import resolve_port

    cfg = resolve_port(cfg, process.name)
    T, noise, gamma, axis = process.num_timesteps, process.noise_levels(), cfg.min_snr.gamma, cfg.power.axis
    return build_schedule(name, T, cfg.exponent(name), noise, gamma, fitted, axis, cfg.offset(name))


def _diff_tuning(
    cfg: ObjectiveConfig,
    process: ForwardProcess,
    backbone: Backbone,
    fit: DataSchedule | None = None,
    frozen: Backbone | None = None,  # a distillation teacher: Diff-Tuning's own loss has none
    kind: type[DiffTuningLoss] | None = None,
    **extra: Any,
) -> DiffTuningLoss:
    from difftune.objectives.diff_tuning import DiffTuningLoss
    from difftune.schedules.ports import resolve_port

    cfg = resolve_port(cfg, process.name)  # a run's config is resolved already; a caller's may not be
    psi, xi = (fit.psi, fit.xi) if fit is not None else (None, None)
    return (kind or DiffTuningLoss)(
        process,
        stream_schedule(cfg, process, cfg.target_schedule, psi),
        stream_schedule(cfg, process, cfg.bank_schedule, xi),
        realisation=cfg.realisation,
        bank_weight=cfg.bank_weight,
        cfg_dropout=cfg.cfg_dropout,
        # the variance term follows what the backbone declares (not the shape of its output), where the
        # process has one (DDPM)
        learn_variance=cfg.learn_variance and backbone.learns_variance and process.has_variance_term,
        **extra,
    )


def _distillation(
    cfg: ObjectiveConfig,
    process: ForwardProcess,
    backbone: Backbone,
    fit: DataSchedule | None = None,
    frozen: Backbone | None = None,
) -> DistillationLoss:
    from difftune.objectives.distillation import DistillationLoss, frozen_copy_teacher, switched_off_teacher

    if needs_teacher_copy(cfg, backbone):
        teacher = frozen_copy_teacher(frozen if frozen is not None else teacher_copy(cfg, backbone))
    elif cfg.distillation.teacher == "stored":  # the bank holds the predictions: no teacher, no copy
        teacher = None
    else:
        teacher = switched_off_teacher(backbone)
    return _diff_tuning(cfg, process, backbone, fit, kind=DistillationLoss, teacher=teacher)


def needs_teacher_copy(cfg: ObjectiveConfig, backbone: Backbone) -> bool:
    """Whether ``cfg``'s objective distils from a frozen copy of the model: distillation with
    ``teacher: copy`` by a method whose adapters cannot be switched off (full fine-tuning); stored
    predictions and switchable adapters need none."""
    from difftune.tuning import can_switch_off

    return cfg.kind == "distillation" and cfg.distillation.teacher == "copy" and not can_switch_off(backbone)


def teacher_copy(cfg: ObjectiveConfig, backbone: Backbone) -> Backbone | None:
    """The frozen copy of the pre-trained model that ``cfg``'s objective distils from (in
    ``objective.distillation.teacher_dtype``), or ``None`` when it needs none (:func:`needs_teacher_copy`).
    Take it before training, restoring a checkpoint or sharding change ``backbone``'s weights."""
    import torch

    from difftune.objectives.distillation import frozen_copy

    if not needs_teacher_copy(cfg, backbone):
        return None
    return frozen_copy(backbone, getattr(torch, cfg.distillation.teacher_dtype))


OBJECTIVES: dict[
    str,
    Callable[[ObjectiveConfig, ForwardProcess, Backbone, DataSchedule | None, Backbone | None], Objective],
] = {
    "diff_tuning": _diff_tuning,
    "distillation": _distillation,
}


def build_objective(
    cfg: ObjectiveConfig,
    process: ForwardProcess,
    backbone: Backbone,
    fit: DataSchedule | None = None,
    frozen: Backbone | None = None,
) -> Objective:
    """The objective ``cfg.kind`` for ``backbone`` under its forward ``process`` (:func:`difftune.process.build_process`).

    ``fit`` gives the ``data_driven`` schedules their weights (ψ for the target, ξ for the bank;
    docs/method.md §10); it is needed when either schedule is ``data_driven``. ``frozen`` is the
    pre-trained copy a distillation objective distils from (:func:`teacher_copy`); without it, the
    copy is taken from ``backbone`` as it is now.

    Raises:
        ValueError: unknown kind (the message lists the valid ones), or a ``data_driven`` schedule
            without a fit.
    """
    if cfg.kind not in OBJECTIVES:
        raise UserError(f"objective.kind={cfg.kind!r} is unknown; valid: {sorted(OBJECTIVES)}")
    return OBJECTIVES[cfg.kind](cfg, process, backbone, fit, frozen)


__all__ = [
    "OBJECTIVES",
    "DiffTuningLoss",
    "DistillationLoss",
    "Draw",
    "LossTerms",
    "Objective",
    "build_objective",
    "needs_teacher_copy",
    "teacher_copy",
    "stream_schedule",
]
