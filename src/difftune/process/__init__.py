"""The forward process of a model, chosen by its scheduler config's class (``_class_name``).

    from difftune.process import build_process
    process = build_process(loaded.scheduler_config)   # DDPMProcess, FlowProcess or EDMProcess
    x_t = process.noised(x0, noise, t)                   # t: indices 0..T-1, 0 the least noisy

``DDPMScheduler`` and its siblings (DDIM, PNDM, DPM-Solver++, Euler, ...) share the β-schedule
process; flow-matching and EDM schedulers have their own. Nothing outside this package needs to
know which it is.
"""

from __future__ import annotations

import logging
from typing import Any

from difftune.errors import UserError
from difftune.process.base import ForwardProcess

# process name -> the diffusers scheduler classes whose configs describe it
SCHEDULER_CLASSES: dict[str, tuple[str, ...]] = {
    "ddpm": (
        "DDPMScheduler",
        "DDIMScheduler",
        "PNDMScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "LMSDiscreteScheduler",
        "UniPCMultistepScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DEISMultistepScheduler",
        "DPMSolverSDEScheduler",
    ),
    "flow": ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"),
    "edm": ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"),
}
logger = logging.getLogger(__name__)
_told: set[tuple[str, str]] = set()  # (sampler asked for, process) pairs already warned about
DEFAULT_SCHEDULER_CLASS = "DDPMScheduler"  # a config that names no class (difftune's own default)
# the sampler each process uses when the one asked for belongs to another process
DEFAULT_SAMPLERS = {
    "ddpm": "DPMSolverMultistepScheduler",
    "flow": "FlowMatchEulerDiscreteScheduler",
    "edm": "EDMEulerScheduler",
}

__all__ = [
    "END_TO_END",
    "SCHEDULER_CLASSES",
    "ForwardProcess",
    "build_process",
    "check_end_to_end",
    "process_name",
    "resolve_pretraining",
]


def process_name(scheduler_config: dict[str, Any]) -> str:
    """``ddpm``, ``flow`` or ``edm``: the process a scheduler config describes.

    A class outside :data:`SCHEDULER_CLASSES` whose config states a β schedule (LCM, TCD, ...) is of
    the DDPM family too. A config that names no class (a scheduler's own ``.config``) is read by its
    keys: ``sigma_data`` is EDM's, a ``shift`` without a β schedule rectified flow's, anything else DDPM.

    Raises:
        UserError: its class is none of :data:`SCHEDULER_CLASSES` and it states no β schedule (the
            message lists the classes).
    """
    cls = scheduler_config.get("_class_name")
    if not cls:
        if "sigma_data" in scheduler_config:
            return "edm"
        return "flow" if "shift" in scheduler_config and "beta_schedule" not in scheduler_config else "ddpm"
    for name, classes in SCHEDULER_CLASSES.items():
        if cls in classes:
            return name
    if "beta_schedule" in scheduler_config:
        return "ddpm"
    valid = ", ".join(c for classes in SCHEDULER_CLASSES.values() for c in classes)
    raise UserError(f"scheduler class {cls!r} names no forward process difftune knows; valid: {valid}")


def build_process(
    scheduler_config: dict[str, Any], sample_shape: tuple[int, ...] | None = None, pretraining: str = "auto"
) -> ForwardProcess:
    """The forward process of a model whose noise schedule is ``scheduler_config``; ``sample_shape``
    (C, H, W) fixes a flow model's resolution-dependent shift (:func:`difftune.process.flow.fixed_shift`);
    ``pretraining`` is the density a flow model was pre-trained with (:func:`resolve_pretraining`;
    ``auto``: uniform), the other processes state their own."""
    name = process_name(scheduler_config)
    if name == "flow":
        from difftune.process.flow import FlowProcess

        return FlowProcess(
            scheduler_config, sample_shape, "uniform" if pretraining == "auto" else pretraining
        )
    if name == "edm":
        from difftune.process.edm import EDMProcess

        return EDMProcess(scheduler_config)
    from difftune.process.ddpm import DDPMProcess

    return DDPMProcess(scheduler_config)


def resolve_pretraining(choice: str, scheduler_config: dict[str, Any], family_density: str) -> str:
    """The pre-training density ``model.pretraining_density`` (``choice``) names for a model whose noise
    schedule is ``scheduler_config`` and whose family states ``family_density``: on a flow model ``auto``
    is the family's (``uniform`` or ``logit_normal``); the other processes state their own (``auto``).

    Raises:
        UserError: a density chosen for a model that is not a flow model.
    """
    name = process_name(scheduler_config)
    if name != "flow":
        if choice != "auto":
            raise UserError(
                f"model.pretraining_density={choice} describes a flow model's pre-training, and this is a {name} "
                "model (its process states its own): remove it"
            )
        return choice
    return family_density if choice == "auto" else choice


def sampler_for(name: str, scheduler_config: dict[str, Any]) -> str:
    """The sampler class to build for a model: ``name`` when it samples the model's process, else
    the process's default (:data:`DEFAULT_SAMPLERS`; a DPM-Solver++ grid means nothing to a flow model)."""
    wanted = process_name(scheduler_config)
    given = next((process for process, classes in SCHEDULER_CLASSES.items() if name in classes), "ddpm")
    if given == wanted:
        return name
    if (name, wanted) not in _told:
        _told.add((name, wanted))
        logger.warning(
            "%s samples %s models and this is a %s model: sampling with %s",
            name,
            given,
            wanted,
            DEFAULT_SAMPLERS[wanted],
        )
    return DEFAULT_SAMPLERS[wanted]
