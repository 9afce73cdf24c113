"""Typed experiment configuration: dataclasses validated on construction, YAML load/dump, overrides.

Every section (one module each: ``model``, ``data``, ``bank``, ``objective``, ``train``, ``tuning``)
validates itself in ``__post_init__`` and raises :class:`ConfigError` with a one-line, actionable
message; a setting that only one objective, schedule or tuning method reads sits in a sub-section
named after it (``objective.distillation.teacher_dtype``, ``tuning.lora.rank``), and how a section
samples is one :class:`~difftune.config.sampling.SamplingSpec` (``bank.sampling``, ``train.sampling``).
Old spellings are upgraded before validation (:mod:`difftune.config.renames`). The resolved
configuration is saved inside every checkpoint, in the new spelling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import yaml

from difftune.config.bank import BankConfig
from difftune.config.checks import ConfigError, _check
from difftune.config.data import DataConfig
from difftune.config.files import parse_value, read_config_file, yaml_problem
from difftune.config.model import NEW_CONTROLNET_TRAINS_IN_FULL, ModelConfig
from difftune.config.objective import ObjectiveConfig
from difftune.config.renames import Upgrade
from difftune.config.sections import build_section, check_key, set_nested
from difftune.config.train import TrainConfig
from difftune.config.tuning import TuningConfig, check_settings_used
from difftune.io.atomic import atomic_write_text

__all__ = [
    "NEW_CONTROLNET_TRAINS_IN_FULL",
    "BankConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "TrainConfig",
    "TuningConfig",
    "apply_overrides",
    "config_from_dict",
    "config_from_mapping",
    "load_config",
    "section_from_dict",
]


@dataclass
class ExperimentConfig:
    """A whole Diff-Tuning experiment: model, target data, bank, objective and training loop.

    Attributes:
        unset: ``section.key`` (``section.sub.key`` in a sub-section) of every setting that the config
            file and the overrides left out, so that its default applies (:func:`load_config` fills
            it; empty for a config built in code).
    """

    model: ModelConfig
    data: DataConfig
    bank: BankConfig = field(default_factory=BankConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    unset: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(
            self.model.controlnet != "from_unet" or self.tuning.method == "full",
            NEW_CONTROLNET_TRAINS_IN_FULL,
        )
        check_settings_used(self.tuning)
        _check(
            self.objective.bank_share == 0.0 or bool(self.bank.path) or not self.uses_bank,
            "objective.bank_share > 0 but bank.path is empty: set bank.path, objective.retention_data=target "
            "or objective.bank_share=0",
        )
        _check(
            self.objective.bank_share == 0.0 or self.bank_count > 0,
            f"objective.bank_share={self.objective.bank_share} of train.batch_size={self.train.batch_size} rounds "
            "to 0 bank samples per batch; raise one of them, or set objective.bank_share=0",
        )
        fitted = self.objective.fitted_schedules
        _check(
            not fitted or self.uses_bank,
            f"objective.{fitted[0] if fitted else ''}=data_driven compares the pre-trained model on the target "
            "data with its own samples and needs a bank: set bank.path, objective.bank_share > 0 and "
            "objective.retention_data=bank, or choose another schedule",
        )

        _check(
            not (self.data.buckets.enabled and (fitted or self.train.eval_every)),
            "data.buckets is not supported with train.eval_every or a data_driven schedule yet (their rows would "
            "mix bucket sizes): set train.eval_every=0 and another schedule, or data.buckets.enabled=false",
        )
        _check(
            not (self.data.buckets.enabled and self.stores_teacher),
            "objective.distillation.teacher=stored is not supported with data.buckets yet: set "
            "objective.distillation.teacher=copy or data.buckets.enabled=false",
        )

        evaluation = self.train.evaluation
        _check(
            not (evaluation.bank_holdout or self.train.keep_best == "forgetting") or bool(self.bank.path),
            "train.evaluation.bank_holdout and train.keep_best=forgetting score the knowledge bank, but bank.path "
            "is empty: set bank.path (a bank of the pre-trained model, `difftune bank`)",
        )

    @property
    def uses_bank(self) -> bool:
        """The retention stream reads the knowledge bank (not the target set)."""
        return self.bank_count > 0 and self.objective.retention_data == "bank"

    @property
    def stores_teacher(self) -> bool:
        """The bank holds the teacher's predictions (``objective.distillation.teacher: stored``)."""
        return self.objective.kind == "distillation" and self.objective.distillation.teacher == "stored"

    @property
    def reads_bank(self) -> bool:
        """The run reads the knowledge bank: to replay it, or to evaluate on it (``train.evaluation``)."""
        evaluates = self.train.eval_every > 0 and self.train.evaluation.reads_bank and bool(self.bank.path)
        return self.uses_bank or evaluates

    @property
    def bank_count(self) -> int:
        """Bank samples per global batch, int(r * B) as in the authors' code."""
        return int(self.objective.bank_share * self.train.batch_size)

    @property
    def default_steps(self) -> bool:
        """``train.max_steps`` was left out of the config, so that its default applies."""
        return "train.max_steps" in self.unset

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of the sections (YAML-serialisable)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (atomically)."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "bank": BankConfig,
    "objective": ObjectiveConfig,
    "train": TrainConfig,
    "tuning": TuningConfig,
}


def setting_default(key: str) -> Any:
    """The default of the setting at the dotted ``key`` (``section.key``, ``section.sub.key``), or
    ``dataclasses.MISSING`` for a key that is unknown or has no default (``model.pretrained``)."""
    section, *parts = key.split(".")
    value: Any = _SECTIONS.get(section)
    for i, part in enumerate(parts):
        if i == 0:  # a section's field: its default, or what its factory makes (a sub-section)
            f = {f.name: f for f in dataclasses.fields(value)}.get(part) if value else None
            if f is None or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
                return dataclasses.MISSING
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        elif dataclasses.is_dataclass(value) and hasattr(value, part):
            value = getattr(value, part)
        else:
            return dataclasses.MISSING
    return dataclasses.MISSING if not parts or dataclasses.is_dataclass(value) else value


def _sections_of(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with each known section copied (a missing one empty), unknown sections kept for the check."""
    for name in _SECTIONS:
        if not isinstance(raw.get(name) or {}, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of key: value")
    return {**raw, **{name: dict(raw.get(name) or {}) for name in _SECTIONS}}


def _override(
    raw: dict[str, Any], overrides: list[str], upgrade: Upgrade
) -> tuple[dict[str, Any], list[str]]:
    """``raw`` (new spelling) with the ``--set`` overrides applied, each key in its new spelling, and those keys."""
    out, keys = _sections_of(raw), []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        given, value = item.split("=", 1)
        key = upgrade.new_key(given.strip())
        if key is None:  # a stream setting that its stream's schedule does not read (said so)
            continue
        check_key(_SECTIONS, key)
        try:
            parsed = parse_value(value)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({yaml_problem(err)}); fix it (a list is "
                f"written [1, 2]), or quote it to give it as text: --set '{given}=\"{value}\"'"
            ) from None
        for name, setting in upgrade.new_values(key, parsed).items():  # an old value: what it stands for
            set_nested(out, name.split("."), setting)
            keys.append(name)
    return out, keys


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` (or ``section.sub.key=value``) overrides to a raw config dict
    (returns a new dict, in the new spelling: old keys of ``raw`` and of the overrides are upgraded,
    each with a deprecation line)."""
    upgrade = Upgrade()
    return _override(upgrade.mapping(raw), overrides, upgrade)[0]


def section_from_dict(name: str, values: dict[str, Any]) -> Any:
    """The section ``name`` (``objective``, ``tuning``, ...) built from a mapping; an old key is
    upgraded with its deprecation line.

    Raises:
        ConfigError: an invalid value, or an old key that now belongs to another section.
    """
    raw = Upgrade().mapping({name: values})
    moved = sorted(set(raw) - {name})
    if moved:
        raise ConfigError(
            f"{moved[0]}: settings of section {name!r} moved to section {moved[0]!r}; give them there"
        )
    return build_section(_SECTIONS[name], raw[name], name)[0]


def config_from_dict(
    raw: dict[str, Any], overridden: Collection[str] = (), upgrade: Upgrade | None = None
) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a nested dict (old keys are upgraded).

    ``overridden``: the keys set explicitly (by ``--set``, new spelling); a ``tuning`` key among
    them that ``tuning.method`` does not read is refused even at its default value.
    """
    raw = (upgrade or Upgrade()).mapping(raw)
    unknown = set(raw) - set(_SECTIONS)
    if unknown & {"tasks", "continual"}:
        raise ConfigError(
            "this config lists a task sequence (tasks:, continual:): run it with `difftune continual --config ...`"
        )
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; valid: {sorted(_SECTIONS)}")
    sections, unset = {}, set()
    for name, cls in _SECTIONS.items():
        sections[name], left = build_section(cls, raw.get(name), name)
        unset |= left
    given = {key.split(".", 1)[1] for key in overridden if key.startswith("tuning.")}
    check_settings_used(sections["tuning"], given)
    return ExperimentConfig(**sections, unset=frozenset(unset))


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config file (or start from defaults when ``path`` is None) and apply overrides.

    An old spelling (:data:`difftune.config.renames.RENAMES`), in the file or in an override, gives
    one deprecation line per key and load.
    """
    return config_from_mapping(read_config_file(path) if path is not None else {}, overrides)


def config_from_mapping(raw: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """:func:`load_config` of a mapping already read (a config file's sections, old spellings allowed)."""
    overrides = overrides or []
    upgrade = Upgrade(schedules=_overridden_schedules(overrides))
    raw, overridden = _override(upgrade.mapping(raw), overrides, upgrade)
    return config_from_dict(raw, overridden, upgrade)


def _overridden_schedules(overrides: list[str]) -> dict[str, Any]:
    """The stream schedules (``target_schedule``, ``bank_schedule``) the overrides set last: old stream
    settings (``objective.target_exponent``) go under the schedule their stream ends up with."""
    schedules = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() in ("objective.target_schedule", "objective.bank_schedule"):
            with contextlib.suppress(yaml.YAMLError):  # refused in one line when the override is applied
                schedules[key.strip().split(".")[1]] = parse_value(value)
    return schedules
