"""The checks every config section runs: one-line errors, declared types (a ``Literal``'s values among
them), finite numbers, model paths."""

from __future__ import annotations

import dataclasses
import math
import types
from functools import cache
from pathlib import Path
from typing import Any, Literal, Protocol, Union, get_args, get_origin, get_type_hints

from difftune.errors import UserError

__all__ = ["ConfigError", "check_model_path", "check_model_paths"]


class ConfigError(UserError, ValueError):
    """An invalid configuration value; the message names the key and how to fix it.

    A :class:`~difftune.errors.UserError`, and a ``ValueError`` so that ``except ValueError`` catches it too.
    """


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@cache
def field_types(cls: type) -> dict[str, Any]:
    """The declared type of each field of the dataclass ``cls`` (its string annotations resolved)."""
    return get_type_hints(cls)


def _members(tp: Any) -> tuple[Any, ...]:
    """The types a union is made of (``tp`` alone when it is not a union)."""
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)


def choices(tp: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal`` type allows (also as part of ``Literal[...] | None``), or ``None``."""
    literals = [arg for member in _members(tp) if get_origin(member) is Literal for arg in get_args(member)]
    return tuple(literals) if literals else None


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if get_origin(tp) is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _accepts(tp: Any, value: Any) -> bool:
    """``value`` is of the (non-Literal) type ``tp``; a bool is no number, an int is a float."""
    if get_origin(tp) in (Union, types.UnionType):
        return any(_accepts(member, value) for member in get_args(tp))
    if tp is type(None):
        return value is None
    if tp in (int, float):
        return isinstance(value, int if tp is int else (int, float)) and not isinstance(value, bool)
    if get_origin(tp) is list:
        return isinstance(value, list) and all(_accepts(get_args(tp)[0], v) for v in value)
    return isinstance(value, tp) if isinstance(tp, type) else True


def check_value(key: str, value: Any, tp: Any) -> None:
    """``value`` of the config key ``key`` is of the declared type ``tp``: one of a ``Literal``'s values
    (the message lists them), a number that is finite, a list of the declared elements.

    Raises:
        ConfigError: the message names the key, the value and what it must be.
    """
    allowed = choices(tp)
    if allowed is not None:
        optional = type(None) in _members(tp)
        ok = (optional and value is None) or any(value == a and type(value) is type(a) for a in allowed)
        _check(ok, f"{key}={value!r}: use one of {list(allowed)}" + (" or null" if optional else ""))
        return
    _check(_accepts(tp, value), f"{key}={value!r} must be {' or '.join(_type_name(m) for m in _members(tp))}")
    if isinstance(value, float):
        _check(math.isfinite(value), f"{key}={value!r} must be a finite number")


def _check_fields(obj: Any, section: str) -> None:
    """Each field of the dataclass ``obj`` has a value of its declared type (:func:`check_value`): no
    2.5 for an int, no text for a number, a ``Literal``'s own values; the message names the key."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        check_value(f"{section}.{f.name}", getattr(obj, f.name), hints[f.name])


def check_model_path(path: str, what: str = "model") -> None:
    """Refuse a missing local path; anything of the form ``owner/name`` may be a hub id.

    ``what`` names the path in the message: a config key (``model.vae``) or a flag (``--vae``).

    Raises:
        FileNotFoundError: ``path`` looks local (absolute, relative, not ``owner/name``, or its first
            part is a local folder) but does not exist.
        UserError: ``path`` is a file.
    """
    local = Path(path).expanduser()
    if local.is_file():
        raise UserError(
            f"{what} {path!r} is a file; give the model's directory (with config.json) or a hub id"
        )
    if local.exists():
        return
    if (
        path.startswith((".", "/", "~")) or path.count("/") != 1 or "" in path.split("/")
    ):  # hub ids are owner/name
        raise FileNotFoundError(f"{what} {path!r} does not exist (give a model directory or a hub id)")
    if Path(path.split("/")[0]).is_dir():  # "runs/x" with a local runs/: a typo, not a hub id
        raise FileNotFoundError(
            f"{what} {path!r} does not exist, although {path.split('/')[0]}/ does here; check the path "
            "(to use a hub model of that name, run from another folder)"
        )


class ModelPaths(Protocol):
    """The model paths of a config (:class:`~difftune.config.experiment.ModelConfig` has them)."""

    pretrained: str
    vae: str | None
    controlnet: str | None


def check_model_paths(model: ModelPaths) -> None:
    """:func:`check_model_path` on ``model.pretrained``, ``model.vae`` and ``model.controlnet``
    (``from_unet`` names no path), before anything is loaded: a typo costs one line, not hub look-ups.

    Raises:
        FileNotFoundError: a local-looking path that does not exist; the message names the key.
        UserError: a path is a file.
    """
    check_model_path(model.pretrained, "model.pretrained")
    if model.vae:
        check_model_path(model.vae, "model.vae")
    if model.controlnet and model.controlnet != "from_unet":
        check_model_path(model.controlnet, "model.controlnet")
