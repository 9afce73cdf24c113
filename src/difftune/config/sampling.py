"""One description of how to sample: scheduler, steps, guidance scale and first seed.

Every place that generates (the knowledge bank, ``difftune sample``, ``difftune eval fid``,
``difftune forgetting``, the training sample grid and the demo) takes a :class:`SamplingSpec`, so the
defaults are written once, here, and the command-line flags come from one helper,
:func:`add_sampling_args`. Nothing here imports diffusers, so building the CLI parser stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from difftune.errors import UserError

DEFAULT_SCHEDULER = "DPMSolverMultistepScheduler"
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE_SCALE = 1.5

# field -> (test, rule): checked by SamplingSpec, and by sampling_spec_from_args naming the flag
_RULES = {
    "steps": (lambda v: isinstance(v, int) and v >= 1, "must be a positive integer"),
    "guidance_scale": (lambda v: v >= 1.0, "must be >= 1 (1 = no guidance)"),
}


@dataclass(frozen=True)
class SamplingSpec:
    """How samples are drawn. Sample ``i`` of a run uses seed ``seed + i``.

    Attributes:
        scheduler: a diffusers scheduler class name (e.g. ``"DPMSolverMultistepScheduler"``).
        scheduler_options: keyword arguments of that class's constructor that replace the model's own
            scheduler config, e.g. ``{"algorithm_type": "sde-dpmsolver++"}`` (stochastic DPM-Solver++)
            or ``{"thresholding": true}``; checked against the class when it is built.
        steps: number of inference steps (>= 1).
        guidance_scale: classifier-free guidance scale; 1 = no guidance.
        seed: seed of the first sample.
    """

    scheduler: str = DEFAULT_SCHEDULER
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    seed: int = 0
    scheduler_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        options = self.scheduler_options
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            err = UserError(f"sampling scheduler options must be a mapping of option: value, got {options!r}")
            err.key, err.rule = "scheduler_options", "must be a mapping of option: value"
            raise err
        for name, (ok, rule) in _RULES.items():
            value = getattr(self, name)
            if not ok(value):
                err = UserError(f"sampling {name.replace('_', ' ')} {rule}, got {value!r}")
                err.key, err.rule = name, rule  # a config section that holds the spec names its own key
                raise err

    def seeds(self, start: int, count: int) -> list[int]:
        """Seeds of samples ``start .. start + count - 1``."""
        return list(range(self.seed + start, self.seed + start + count))

    def describe(self) -> str:
        """One line for plans and logs, e.g. ``DPMSolverMultistepScheduler, 25 steps, guidance 1.5``."""
        options = "".join(f" {key}={value}" for key, value in self.scheduler_options.items())
        name = f"{self.scheduler}({options.strip()})" if options else self.scheduler
        return f"{name}, {self.steps} steps, guidance {self.guidance_scale:g}"


_FLAGS = {
    "scheduler": "--scheduler",
    "scheduler_options": "--scheduler-option",
    "steps": "--steps",
    "guidance_scale": "--guidance-scale",
    "seed": "--seed",
}


def add_sampling_args(
    parser: argparse.ArgumentParser | Any, with_defaults: bool = True, **defaults: Any
) -> None:
    """Add ``--scheduler``, ``--steps``, ``--guidance-scale`` and ``--seed`` to a parser or argument group.

    Args:
        parser: an ``argparse`` parser or argument group.
        with_defaults: when False every flag defaults to ``None``, so a command can tell which were
            given (:func:`sampling_spec_from_args` fills in the rest).
        defaults: per-command defaults that differ from :class:`SamplingSpec`'s (e.g. ``guidance_scale=1.0``).
    """
    base = {f.name: defaults.get(f.name, f.default) for f in fields(SamplingSpec)}
    shown = {name: (value if with_defaults else None) for name, value in base.items()}
    parser.add_argument(
        "--scheduler",
        default=shown["scheduler"],
        help=f"diffusers scheduler class name (default {base['scheduler']})",
    )
    parser.add_argument(
        "--scheduler-option",
        dest="scheduler_options",
        action="append",
        type=parse_scheduler_option,
        metavar="KEY=VALUE",
        help="a scheduler constructor argument (repeatable; VALUE read as YAML), e.g. "
        "--scheduler-option algorithm_type=sde-dpmsolver++",
    )
    parser.add_argument(
        "--steps", type=int, default=shown["steps"], help=f"sampling steps (default {base['steps']})"
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=shown["guidance_scale"],
        help=f"classifier-free guidance scale, 1 = off (default {base['guidance_scale']:g})",
    )
    parser.add_argument(
        "--seed", type=int, default=shown["seed"], help=f"image i uses seed + i (default {base['seed']})"
    )


def parse_scheduler_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--scheduler-option``, the value read as YAML (``true``, ``1.5``, a word)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def given_sampling_flags(args: argparse.Namespace) -> list[str]:
    """The sampling flags given on the command line (for parsers built with ``with_defaults=False``)."""
    return [flag for name, flag in _FLAGS.items() if getattr(args, name, None) is not None]


def sampling_spec_from_args(args: argparse.Namespace, **defaults: Any) -> SamplingSpec:
    """The :class:`SamplingSpec` of parsed arguments; flags left at ``None`` take ``defaults`` or the spec's own.

    Raises:
        ValueError: an invalid value (the message names the flag and its value).
    """
    values = {}
    for f in fields(SamplingSpec):
        value = getattr(args, f.name, None)
        if f.name == "scheduler_options":
            values[f.name] = dict(value) if value else dict(defaults.get(f.name, {}))
            continue
        values[f.name] = defaults.get(f.name, f.default) if value is None else value
    for name, (ok, rule) in _RULES.items():
        if not ok(values[name]):
            raise UserError(f"{_FLAGS[name]} {rule}, got {values[name]!r}")
    return SamplingSpec(**values)
