"""Names a package exports but imports only on first use, so that light work (building the parser,
checking a config) does not wait for torch, diffusers or transformers."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, modules: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for ``package``: name ``n`` of ``modules`` comes from
    ``package.<modules[n]>``, imported the first time it is asked for.

    Use as ``__getattr__ = lazy_exports(__name__, {"Name": "submodule", ...})`` in the package's ``__init__``.
    """

    def __getattr__(name: str) -> Any:
        if name not in modules:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{modules[name]}"), name)

    return __getattr__
