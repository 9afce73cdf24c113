"""User code named in a setting as ``"package.module:name"`` (a schedule density, a feature extractor, an
annotator), imported in one place with one kind of error."""

from __future__ import annotations

import importlib
from typing import Any

from difftune.errors import UserError


def import_object(spec: str, what: str) -> Any:
    """The object ``name`` of module ``package.module`` for ``spec = "package.module:name"``.

    Args:
        spec: ``"package.module:name"``.
        what: how the setting is called in messages, e.g. ``"schedule"`` or ``"--features"``.

    Raises:
        UserError: ``spec`` has no ``:``, the module cannot be imported or has no such name.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{what} {spec!r} is not of the form 'package.module:name'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"{what} {spec!r}: cannot import {attr!r} from {module_name!r} ({err})") from None
