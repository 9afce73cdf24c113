"""The checks every config section runs: one-line errors, declared types, finite numbers, model paths."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Protocol

from difftune.errors import UserError

__all__ = ["ConfigError", "check_model_path", "check_model_paths"]


class ConfigError(UserError, ValueError):
    """An invalid configuration value; the message names the key and how to fix it.

    A :class:`~difftune.errors.UserError`, and a ``ValueError`` so that ``except ValueError`` catches it too.
    """


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "None": (type(None),),
    "list[int]": (list,),
    "list[float]": (list,),
    "list[str]": (list,),
}
_ELEMENTS: dict[str, tuple[type, ...]] = {
    "list[int]": (int,),
    "list[float]": (int, float),
    "list[str]": (str,),
}


def _check_fields(obj: Any, section: str) -> None:
    """Each field has a value of its declared type (no 2.5 for an int, no text for a number) and
    every number is finite; the message names the key."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        allowed = tuple(t for k in kinds for t in _TYPES.get(k, (object,)))
        is_bool = isinstance(value, bool)
        ok = isinstance(value, allowed) and (not is_bool or bool in allowed)
        _check(ok, f"{section}.{f.name}={value!r} must be {' or '.join(kinds)}")
        if isinstance(value, float):
            _check(math.isfinite(value), f"{section}.{f.name}={value!r} must be a finite number")
        if isinstance(value, list):
            element = next(_ELEMENTS[k] for k in kinds if k in _ELEMENTS)
            _check(
                all(isinstance(v, element) and not isinstance(v, bool) for v in value),
                f"{section}.{f.name}={value!r} must be {' or '.join(kinds)}",
            )


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
