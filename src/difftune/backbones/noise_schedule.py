"""A model's noise schedule: read once, written back unchanged, so that every copy samples alike.

diffusers builds a sampler with ``SchedulerClass.from_config(config)``. Keys the config states are
taken from it; keys it leaves out take *that sampler's* defaults, which differ between classes
(``timestep_spacing`` is ``"leading"`` for DDPM and ``"linspace"`` for DPM-Solver++). So a schedule
written back with more keys than it was read with, or an in-memory default schedule that states
none, gives the same weights another timestep grid. difftune therefore

* reads a schedule as the keys its file states (:func:`read_noise_schedule`),
* writes it back with exactly those keys (:func:`write_noise_schedule`), and
* gives a model without a schedule :data:`DEFAULT_NOISE_SCHEDULE`, every key stated, which every
  output of that model (``final/``, checkpoints, exports, banks, sample folders) then records.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from difftune.errors import shown_path
from difftune.process import DEFAULT_SCHEDULER_CLASS
from difftune.process.schedulers import DEFAULT_NOISE_SCHEDULE, read_scheduler_config

logger = logging.getLogger(__name__)

SCHEDULER_FILE = "scheduler_config.json"

_warned: set[str] = set()


def read_noise_schedule(
    pretrained: str, subfolder: str | None, in_pipeline: bool, revision: str | None = None
) -> dict[str, Any]:
    """The noise schedule of the model at ``pretrained``: the keys its scheduler config states.

    Read from the pipeline's ``scheduler/`` when ``in_pipeline`` (the pipeline lists one), else from
    beside the model in ``subfolder``. A model without one gets :data:`DEFAULT_NOISE_SCHEDULE`, with
    a warning once per model and process.
    """
    if in_pipeline:
        return stated_keys(read_scheduler_config(pretrained, subfolder="scheduler", revision=revision))
    beside = Path(pretrained) / (subfolder or "")
    if (beside / SCHEDULER_FILE).is_file():
        return stated_keys(read_scheduler_config(str(beside)))
    if pretrained not in _warned:
        _warned.add(pretrained)
        logger.warning(
            "%s has no noise schedule (scheduler/); using difftune's default (DDPM, linear betas "
            "1e-4..0.02, 1000 steps, epsilon), which every output of this model records",
            shown_path(pretrained),
        )
    return dict(DEFAULT_NOISE_SCHEDULE)


def stated_keys(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the keys diffusers filled in with defaults (``_use_default_values``) and
    without its version stamp: what the schedule actually states."""
    defaults = set(config.get("_use_default_values", ()))
    return {
        key: value
        for key, value in config.items()
        if key not in defaults and key not in ("_use_default_values", "_diffusers_version")
    }


def write_noise_schedule(schedule: dict[str, Any], directory: str | os.PathLike) -> None:
    """Write ``schedule`` as ``directory/scheduler_config.json`` with exactly its stated keys, so the
    copy loads (in difftune and in stock diffusers) with the same values and the same defaults."""
    import diffusers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"_class_name": scheduler_class_name(schedule), **stated_keys(schedule)}
    record["_diffusers_version"] = diffusers.__version__
    (directory / SCHEDULER_FILE).write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")


def scheduler_class_name(schedule: dict[str, Any]) -> str:
    """The diffusers scheduler class ``schedule`` was written for (the default DDPM one when unknown)."""
    import diffusers

    name = schedule.get("_class_name")
    return name if isinstance(name, str) and hasattr(diffusers, name) else DEFAULT_SCHEDULER_CLASS
