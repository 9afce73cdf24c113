"""Which parameters train: a tuning method prepares a model and names its trainable parameters.

``tuning.method`` in the config picks one by name from :data:`TUNING_METHODS`. The trainer calls
:func:`prepare_tuning` once and optimises (and keeps the EMA of) exactly the parameters it returns;
nothing else in the loop knows which method is used. A new method (LoRA, BitFit, ...) is a new
module here with a class that implements :class:`TuningMethod`, added to the registry. Every
piece a method adds can be switched off (:func:`adapters_off`): the model then computes the
pre-trained function exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from difftune.config.tuning import TuningConfig
from difftune.errors import UserError
from difftune.lazy import lazy_exports
from difftune.plugins import import_object

if TYPE_CHECKING:
    from torch import nn

    from difftune.tuning.base import TuningMethod

# the module of each public name that needs torch: imported on first use, so that a config is checked
# (``tuning.method`` against :data:`TUNING_METHODS`, ``tuning.*`` by :class:`TuningConfig`) without torch
__getattr__ = lazy_exports(
    __name__,
    {
        "AdaptFormerTuning": "adaptformer",
        "BitFitTuning": "bitfit",
        "DiffFitTuning": "difffit",
        "FullTuning": "full",
        "PeftTuning": "lora",
        "SVDiffTuning": "svdiff",
        "VPTTuning": "vpt",
        "TuningMethod": "base",
        "trainable_parameters": "base",
        "Switchable": "switch",
        "adapters_off": "switch",
        "can_switch_off": "switch",
    },
)


def _method(class_name: str, **kwargs: Any) -> Callable[[TuningConfig], TuningMethod]:
    """The builder of the tuning method class ``class_name`` (imported when it builds one)."""

    def build(settings: TuningConfig) -> TuningMethod:
        return __getattr__(class_name)(settings, **kwargs)

    return build


TUNING_METHODS: dict[str, Callable[[TuningConfig], TuningMethod]] = {
    "full": _method("FullTuning"),
    "lora": _method("PeftTuning", kind="lora"),
    "loha": _method("PeftTuning", kind="loha"),
    "lokr": _method("PeftTuning", kind="lokr"),
    "bitfit": _method("BitFitTuning"),
    "difffit": _method("DiffFitTuning"),
    "adaptformer": _method("AdaptFormerTuning"),
    "vpt": _method("VPTTuning"),
    "svdiff": _method("SVDiffTuning"),
}


def build_tuning(name: str, settings: TuningConfig | None = None) -> TuningMethod:
    """The tuning method registered as ``name``, or a user's class named ``"package.module:Class"``
    (built as ``Class(settings)``), with ``settings`` (defaults when ``None``).

    Raises:
        UserError: unknown name (the message lists the valid ones), or a class that cannot be imported.
    """
    if ":" in name:
        return import_object(name, "tuning.method")(settings or TuningConfig())
    if name not in TUNING_METHODS:
        raise UserError(f"unknown tuning method {name!r}; valid: {sorted(TUNING_METHODS)}")
    return TUNING_METHODS[name](settings or TuningConfig())


def prepare_tuning(model: nn.Module, name: str, settings: TuningConfig | None = None) -> list[nn.Parameter]:
    """Prepare ``model`` for the tuning method ``name``; returns its trainable parameters in module order."""
    return build_tuning(name, settings).prepare(model)


__all__ = [
    "TUNING_METHODS",
    "FullTuning",
    "Switchable",
    "TuningConfig",
    "TuningMethod",
    "adapters_off",
    "can_switch_off",
    "build_tuning",
    "prepare_tuning",
    "trainable_parameters",
]
