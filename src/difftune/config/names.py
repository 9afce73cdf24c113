"""The names a config may choose from: timestep schedules (``objective.target_schedule``,
``objective.bank_schedule``), objectives (``objective.kind``) and tuning methods (``model.tuning``).

A config is checked against these without importing torch or the registries that build them:
:mod:`difftune.schedules.base`, :mod:`difftune.objectives` and :mod:`difftune.tuning` register one
builder under each name (``tests/test_startup.py`` checks that each pair agrees).
"""

from __future__ import annotations

SCHEDULE_NAMES = ("uniform", "power_up", "power_down")  # built from T alone
SNR_SCHEDULE_NAMES = ("min_snr", "inverse_snr")  # built from the model's noise levels
# built from the model's pre-training density, shifted in log-SNR (objective.target_offset / bank_offset)
NOISE_LEVEL_SCHEDULE_NAMES = ("logit_normal_up", "logit_normal_down")
SCHEDULE_AXES = ("index", "log_snr")  # objective.schedule_axis: what the power schedules act on
FITTED_SCHEDULE_NAMES = ("data_driven",)  # fitted from data before training
OBJECTIVE_NAMES = ("diff_tuning", "distillation")
TUNING_METHOD_NAMES = ("full", "lora", "loha", "lokr", "bitfit", "difffit", "adaptformer", "vpt", "svdiff")


def schedule_names() -> list[str]:
    """Every registered schedule name (a ``"package.module:function"`` density is valid too)."""
    return sorted(SCHEDULE_NAMES + SNR_SCHEDULE_NAMES + NOISE_LEVEL_SCHEDULE_NAMES + FITTED_SCHEDULE_NAMES)


def is_schedule_name(name: str) -> bool:
    """``name`` names a registered schedule or a ``"package.module:function"`` density."""
    return name in schedule_names() or ":" in name
