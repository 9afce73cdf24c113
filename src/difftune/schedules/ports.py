"""How the paper's ψ and ξ travel to a model's forward process (``objective.power.axis``), and which
port ``auto`` picks for each process.

The power schedules ``power_up``/``power_down`` are the paper's ψ/ξ, defined on the DDPM linear
schedule. On another process they can mean three things (docs/method.md §12.1):

- ``index``: the power law over the model's own index (the paper's code, unchanged on DDPM);
- ``log_snr``: the DDPM power law carried to the model by matching log-SNR;
- ``offsets``: the model's own pre-training density moved toward noise and toward data, i.e.
  ``power_up`` is ``logit_normal_up`` and ``power_down`` is ``logit_normal_down``, with the offsets of
  ``objective.logit_normal_up/down.offset`` (default 1.1, the shift of the paper's s = 1 in logit σ).

``auto`` (the default) is the port difftune recommends for the model's process
(:data:`RECOMMENDED_AXIS`, from the study in docs/reproduction.md §14). A run resolves the axis once its
process is known (:func:`resolve_port`) and saves what it ran in its ``config.yaml``: the concrete axis,
and on the offsets port the noise-level schedules themselves, so a run's record does not change when a
recommendation does.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from difftune.config.objective import ObjectiveConfig
from difftune.errors import UserError

logger = logging.getLogger(__name__)
# the port of each process (docs/reproduction.md §14; 5 seeds of each transfer, each method at its own best
# sampling): the paper's index port unless another beats it significantly. On flow none does (log_snr is
# significantly worse; offsets too, pooled over the four flow beds: +0.84 FID [+0.16, +1.51]). On EDM the
# offsets port beats index on the photo source (-6.17 [-10.34, -2.00], 5/5 seeds, §14.6) and leads it on
# every EDM bed (pooled over the four: -3.30 [-5.39, -1.22], 14/20 seeds), so it is EDM's default
RECOMMENDED_AXIS = {"ddpm": "index", "flow": "index", "edm": "offsets"}
# what the power schedules become on the offsets port
OFFSET_SCHEDULES = {"power_up": "logit_normal_up", "power_down": "logit_normal_down"}


def concrete_axis(axis: str, process: str) -> str:
    """``axis``, with ``auto`` replaced by the recommended port of ``process`` (``ddpm``, ``flow``, ``edm``).

    Raises:
        UserError: ``auto`` for a process without a recommendation.
    """
    if axis != "auto":
        return axis
    if process not in RECOMMENDED_AXIS:
        raise UserError(
            f"objective.power.axis=auto has no recommended port for the {process!r} process; set "
            "objective.power.axis to index, log_snr or offsets"
        )
    return RECOMMENDED_AXIS[process]


def resolve_port(cfg: ObjectiveConfig, process: str) -> ObjectiveConfig:
    """``cfg`` as it runs on ``process``: ``objective.power.axis: auto`` made concrete, and on the offsets
    port the power schedules replaced by the noise-level ones (axis ``index``, which nothing then reads).
    A concrete config is returned as it is."""
    axis = concrete_axis(cfg.power.axis, process)
    if axis != cfg.power.axis and {"power_up", "power_down"} & {cfg.target_schedule, cfg.bank_schedule}:
        logger.info(
            "objective.power.axis: auto is the %s port, the one recommended for %s models", axis, process
        )
    if axis == "offsets":
        target, bank = (OFFSET_SCHEDULES.get(n, n) for n in (cfg.target_schedule, cfg.bank_schedule))
        return replace(
            cfg, target_schedule=target, bank_schedule=bank, power=replace(cfg.power, axis="index")
        )
    return cfg if axis == cfg.power.axis else replace(cfg, power=replace(cfg.power, axis=axis))
