"""Old config spellings and their new ones: the one table of renamed keys, and the upgrade of a raw
config (a file, a checkpoint's saved ``config.yaml``, the ``--set`` keys) to the new spelling.

A config is upgraded before it is validated, so an old file and an old run's ``config.yaml`` still
load: each old key gives one deprecation line, once per load, that names its new spelling
(``objective.teacher_dtype is deprecated: use objective.distillation.teacher_dtype``). A setting whose
old values are spelled differently now (:data:`OLD_VALUES`: ``bank.prompts`` held a prompt file's path,
now ``bank.prompts: file`` with ``bank.prompts_file``) is upgraded the same way, one line per old value.
A file that gives one setting in both spellings is refused in one line. Resuming compares the upgraded
forms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from difftune.config.bank import PROMPT_MODES
from difftune.config.checks import ConfigError
from difftune.config.objective import LOGIT_NORMAL_SCHEDULES, POWER_SCHEDULES, ObjectiveConfig
from difftune.config.sections import set_nested

logger = logging.getLogger(__name__)

# old dotted key -> new dotted key
RENAMES: dict[str, str] = {
    "model.tuning": "tuning.method",
    "tuning.lora_rank": "tuning.lora.rank",
    "tuning.lora_alpha": "tuning.lora.alpha",
    "tuning.lora_dropout": "tuning.lora.dropout",
    "tuning.lora_targets": "tuning.lora.targets",
    "tuning.difffit_blocks": "tuning.difffit.blocks",
    "tuning.adaptformer_dim": "tuning.adaptformer.dim",
    "tuning.adaptformer_scale": "tuning.adaptformer.scale",
    "tuning.vpt_tokens": "tuning.vpt.tokens",
    "tuning.svdiff_targets": "tuning.svdiff.targets",
    "bank.scheduler": "bank.sampling.scheduler",
    "bank.num_inference_steps": "bank.sampling.steps",
    "bank.guidance_scale": "bank.sampling.guidance_scale",
    "bank.seed": "bank.sampling.seed",
    "train.sample_scheduler": "train.sampling.scheduler",
    "train.sample_steps": "train.sampling.steps",
    "train.sample_guidance_scale": "train.sampling.guidance_scale",
    "objective.teacher_dtype": "objective.distillation.teacher_dtype",
    "objective.snr_gamma": "objective.min_snr.gamma",
    "objective.schedule_axis": "objective.power.axis",
    "objective.data_schedule_bins": "objective.data_driven.bins",
    "objective.data_schedule_draws": "objective.data_driven.draws",
}
# settings that belonged to a stream and now belong to a schedule: old key -> (the stream's schedule
# key, the setting, the schedules that have it). The old key moves under the schedule its stream
# uses (objective.target_exponent with target_schedule: power_down is objective.power_down.exponent);
# a stream whose schedule has no such setting never read it, and it is left out.
PER_SCHEDULE: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "objective.target_exponent": ("target_schedule", "exponent", POWER_SCHEDULES),
    "objective.bank_exponent": ("bank_schedule", "exponent", POWER_SCHEDULES),
    "objective.target_offset": ("target_schedule", "offset", LOGIT_NORMAL_SCHEDULES),
    "objective.bank_offset": ("bank_schedule", "offset", LOGIT_NORMAL_SCHEDULES),
}
STREAMS = ("target_schedule", "bank_schedule")


def _bank_prompts(value: Any) -> dict[str, Any] | None:
    """``bank.prompts`` was null (the target's captions) or a prompt file's path: a string that is no
    mode and has a folder or an extension in it, or names a file (another string is a wrong mode)."""
    if value is None:
        return {"bank.prompts": "captions"}
    named = isinstance(value, str) and (any(mark in value for mark in "/\\.") or Path(value).is_file())
    if named and value not in PROMPT_MODES:
        return {"bank.prompts": "file", "bank.prompts_file": value}
    return None


# settings whose old values are spelled differently now: key -> the settings an old value stands for
# (``None`` for a value in the new spelling)
OLD_VALUES: dict[str, Callable[[Any], dict[str, Any] | None]] = {"bank.prompts": _bank_prompts}


def _get(raw: Mapping[str, Any], key: str) -> Any:
    """The value at the dotted ``key`` of a nested mapping, or ``_MISSING``."""
    value: Any = raw
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


_MISSING = object()


class Upgrade:
    """One load's upgrade of old spellings; it says each deprecation once.

    Args:
        warn: log the deprecation lines (off for a config that is only compared, such as a
            checkpoint's on resume: its file is not the user's to change).
        schedules: the schedule each stream ends up with (``target_schedule``, ``bank_schedule``,
            after the ``--set`` overrides), which places the stream settings of :data:`PER_SCHEDULE`;
            a stream not given takes the one of the mapping being upgraded, else the default.
    """

    def __init__(self, warn: bool = True, schedules: Mapping[str, Any] | None = None) -> None:
        self.warn = warn
        self.said: set[str] = set()
        defaults = ObjectiveConfig()
        self.schedules = {key: getattr(defaults, key) for key in STREAMS} | dict(schedules or {})
        self._given = set(schedules or ())

    def _say(self, old: str, message: str) -> None:
        if self.warn and old not in self.said:
            logger.warning("%s is deprecated: %s", old, message)
        self.said.add(old)

    def new_key(self, key: str) -> str | None:
        """The new spelling of the dotted ``key`` (``key`` itself when it is not an old one; ``None`` for
        a stream setting its stream's schedule does not read); says the deprecation the first time."""
        if key in RENAMES:
            self._say(key, f"use {RENAMES[key]}")
            return RENAMES[key]
        if key not in PER_SCHEDULE:
            return key
        stream, setting, schedules = PER_SCHEDULE[key]
        schedule = self.schedules[stream]
        if schedule in schedules:
            new = f"objective.{schedule}.{setting}"
            self._say(key, f"use {new} (the {setting} of objective.{stream}={schedule})")
            return new
        either = " or ".join(f"objective.{name}.{setting}" for name in schedules)
        self._say(
            key,
            f"use {either}, the {setting} of the schedule a stream uses; objective.{stream}={schedule} "
            "reads neither, so it is left out",
        )
        return None

    def new_values(self, key: str, value: Any) -> dict[str, Any]:
        """The settings (dotted key -> value) that ``value`` of the (new-spelling) ``key`` stands for:
        ``{key: value}`` itself unless it is an old value (:data:`OLD_VALUES`), whose deprecation is
        said the first time."""
        new = OLD_VALUES[key](value) if key in OLD_VALUES else None
        if new is None:
            return {key: value}
        use = " and ".join(f"{name}={_shown(setting)}" for name, setting in new.items())
        self._say(f"{key}={_shown(value)}", f"use {use}")
        return new

    def mapping(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """``raw`` (sections of settings) with every old key moved to its new spelling, and every old
        value replaced by the settings it stands for (:data:`OLD_VALUES`).

        Raises:
            ConfigError: a setting given in both spellings (an old key or value and what it becomes; or
                twice through two old stream settings, with different values), or an old key whose new
                place is not a mapping.
        """
        objective = raw.get("objective")
        for stream in STREAMS:
            given = objective.get(stream) if isinstance(objective, Mapping) else None
            if stream not in self._given and isinstance(given, str):
                self.schedules[stream] = given
        out = {name: dict(values) if isinstance(values, Mapping) else values for name, values in raw.items()}
        moved: dict[str, tuple[str, Any]] = {}  # new key -> the old key (and value) moved there
        for old in old_keys(raw):
            section, name = old.split(".", 1)
            value = out[section].pop(name)
            new = self.new_key(old)
            if new is None:
                continue
            if new in moved:
                first, before = moved[new]
                if before != value:
                    raise ConfigError(
                        f"{first}={before!r} and {old}={value!r} both become {new} (both streams use that "
                        f"schedule); give {new} once"
                    )
                continue
            if _get(out, new) is not _MISSING:
                raise ConfigError(
                    f"{old} and {new} are the same setting, in its old and its new spelling; keep {new} only"
                )
            _place(out, new)
            set_nested(out, new.split("."), value)
            moved[new] = (old, value)
        for key in OLD_VALUES:
            value = _get(out, key)
            if value is _MISSING:
                continue
            for name, setting in self.new_values(key, value).items():
                if name != key and _get(out, name) is not _MISSING:
                    raise ConfigError(
                        f"{key}={_shown(value)} is the old spelling of {name}, which is given too; keep "
                        f"{name} only"
                    )
                set_nested(out, name.split("."), setting)
        return out


def _shown(value: Any) -> str:
    """A setting's value as a config states it (``null`` for ``None``)."""
    return "null" if value is None else str(value)


def old_keys(raw: Mapping[str, Any]) -> list[str]:
    """The old keys ``raw`` holds, and the keys of the old values it holds, in the tables' order."""
    keys = [key for key in (*RENAMES, *PER_SCHEDULE) if _get(raw, key) is not _MISSING]
    values = ((key, _get(raw, key)) for key in OLD_VALUES)
    return keys + [
        key for key, value in values if value is not _MISSING and OLD_VALUES[key](value) is not None
    ]


def _place(out: dict[str, Any], key: str) -> None:
    """Refuse to move a setting under a value that is not a mapping (that value is wrong, and would be lost)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        value = _get(out, ".".join(parts[:i]))
        if value is not _MISSING and value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{'.'.join(parts[:i])}={value!r} must be a mapping of key: value")


def upgrade(raw: Mapping[str, Any], warn: bool = True) -> dict[str, Any]:
    """``raw`` in the new spelling (:meth:`Upgrade.mapping` of a new :class:`Upgrade`)."""
    return Upgrade(warn).mapping(raw)
