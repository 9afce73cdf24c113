"""Config sections as nested dataclasses: one built from its mapping (noting the keys left to their
defaults), the dotted keys of a nested mapping, and the walk a ``--set section.sub.key`` takes.

A section's field whose type is a dataclass is a sub-section (``tuning.lora``, ``bank.sampling``,
``objective.distillation``): a mapping in YAML, a nested dataclass in code, its keys written
``section.sub.key`` in messages, in ``--set`` and in ``ExperimentConfig.unset``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from difftune.config.checks import ConfigError, check_value, field_types
from difftune.errors import UserError


def sub_section(cls: type, name: str) -> type | None:
    """The dataclass of ``cls``'s field ``name`` when that field is a sub-section, else ``None``."""
    tp = field_types(cls).get(name)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def leaf_keys(cls: type, prefix: str) -> set[str]:
    """The dotted keys of every setting of the section ``cls`` written at ``prefix`` (sub-sections walked)."""
    keys = set()
    for f in dataclasses.fields(cls):
        sub = sub_section(cls, f.name)
        keys |= leaf_keys(sub, f"{prefix}.{f.name}") if sub else {f"{prefix}.{f.name}"}
    return keys


def build_section(cls: type, values: Any, path: str) -> tuple[Any, set[str]]:
    """The section ``cls`` built from its mapping ``values`` (sub-sections from nested mappings; a
    sub-section given as null or left out takes its defaults), and the dotted keys left to their defaults.

    Raises:
        ConfigError: ``values`` is not a mapping, names an unknown key, or holds an invalid value (the
            message names the key).
    """
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section {path!r} must be a mapping of key: value")
    valid = [f.name for f in dataclasses.fields(cls)]
    bad = set(values) - set(valid)
    if bad:
        raise ConfigError(f"unknown key(s) {sorted(bad)} in section {path!r}; valid: {sorted(valid)}")
    kwargs, unset = {}, set()
    for name in valid:
        key, sub = f"{path}.{name}", sub_section(cls, name)
        if name not in values:
            unset |= leaf_keys(sub, key) if sub else {key}
        elif sub:
            kwargs[name], inner = build_section(sub, values[name], key)
            unset |= inner
        else:
            if "." in path:  # a sub-section's values are checked before it is built, with their keys
                check_value(key, values[name], field_types(cls)[name])
            kwargs[name] = values[name]
    try:
        return cls(**kwargs), unset
    except ConfigError:
        raise
    except UserError as err:  # a shared class (SamplingSpec) that does not know where it sits
        key, rule = getattr(err, "key", None), getattr(err, "rule", None)
        if key in kwargs and rule:
            raise ConfigError(f"{path}.{key}={kwargs[key]!r} {rule}") from None
        raise ConfigError(f"{path}: {err}") from None
    except TypeError as err:
        raise ConfigError(f"section {path!r}: {err}") from None


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{dotted key: value}`` (a value that is a mapping is walked, a list is kept)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def set_nested(values: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``values[parts[0]][parts[1]]...`` to ``value``, making (copies of) the mappings on the way."""
    for part in parts[:-1]:
        inner = values.get(part)
        values[part] = dict(inner) if isinstance(inner, Mapping) else {}
        values = values[part]
    values[parts[-1]] = value


def check_key(sections: Mapping[str, type], key: str) -> None:
    """``key`` (``section.key`` or ``section.sub.key``) names a setting or a sub-section.

    Raises:
        ConfigError: an unknown section or key; the message lists the valid ones at the first wrong part.
    """
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in sections:
        raise ConfigError(
            f"override key {key!r} must be section.key (or section.sub.key) with section in {sorted(sections)}"
        )
    cls: type | None = sections[parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        valid = {f.name for f in dataclasses.fields(cls)} if cls else set()
        if part not in valid:
            where = ".".join(parts[:i])
            raise ConfigError(f"unknown key {key!r}; valid keys of {where!r}: {sorted(valid)}")
        cls = sub_section(cls, part)
        if cls is None and i < len(parts) - 1:
            raise ConfigError(f"unknown key {key!r}: {'.'.join(parts[: i + 1])} is a setting, not a section")
