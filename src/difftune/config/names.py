"""The names a config may choose from: timestep schedules (``objective.target_schedule``,
``objective.bank_schedule``), objectives (``objective.kind``) and tuning methods (``tuning.method``). A choice with a fixed
set of values is a ``Literal`` type (the config's checks list its values).

A config is checked against these without importing torch or the registries that build them:
:mod:`difftune.schedules.base`, :mod:`difftune.objectives` and :mod:`difftune.tuning` register one
builder under each name (``tests/test_startup.py`` checks that each pair agrees).
"""

from __future__ import annotations

from typing import Literal, get_args

SCHEDULE_NAMES = ("uniform", "power_up", "power_down")  # built from T alone
SNR_SCHEDULE_NAMES = ("min_snr", "inverse_snr", "pretraining")  # built from the model's noise levels
# built from the model's pre-training density, shifted in log-SNR (objective.logit_normal_up.offset / _down.offset)
NOISE_LEVEL_SCHEDULE_NAMES = ("logit_normal_up", "logit_normal_down")
# objective.power.axis: how the power schedules travel to the model's process (schedules/ports.py)
ScheduleAxis = Literal["auto", "index", "log_snr", "offsets"]
SCHEDULE_AXES: tuple[str, ...] = get_args(ScheduleAxis)
FITTED_SCHEDULE_NAMES = ("data_driven",)  # fitted from data before training
ObjectiveKind = Literal["diff_tuning", "distillation"]
OBJECTIVE_NAMES: tuple[str, ...] = get_args(ObjectiveKind)
TUNING_METHOD_NAMES = ("full", "lora", "loha", "lokr", "bitfit", "difffit", "adaptformer", "vpt", "svdiff")


def schedule_names() -> list[str]:
    """Every registered schedule name (a ``"package.module:function"`` density is valid too)."""
    return sorted(SCHEDULE_NAMES + SNR_SCHEDULE_NAMES + NOISE_LEVEL_SCHEDULE_NAMES + FITTED_SCHEDULE_NAMES)


def is_schedule_name(name: str) -> bool:
    """``name`` names a registered schedule or a ``"package.module:function"`` density."""
    return name in schedule_names() or ":" in name
