"""Which parameters train: a tuning method prepares a model and names its trainable parameters.

``model.tuning`` in the config picks one by name from :data:`TUNING_METHODS`. The trainer calls
:func:`prepare_tuning` once and optimises (and keeps the EMA of) exactly the parameters it returns;
nothing else in the loop knows which method is used. A new method (LoRA, BitFit, ...) is a new
module here with a class that implements :class:`TuningMethod`, added to the registry. Every
piece a method adds can be switched off (:func:`adapters_off`): the model then computes the
pre-trained function exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from difftune.errors import UserError
from difftune.tuning.adaptformer import AdaptFormerTuning
from difftune.tuning.base import TuningMethod, trainable_parameters
from difftune.tuning.bitfit import BitFitTuning
from difftune.tuning.difffit import DiffFitTuning
from difftune.tuning.full import FullTuning
from difftune.tuning.lora import PeftTuning
from difftune.tuning.settings import TuningConfig
from difftune.tuning.svdiff import SVDiffTuning
from difftune.tuning.switch import Switchable, adapters_off, can_switch_off
from difftune.tuning.vpt import VPTTuning

TUNING_METHODS: dict[str, Callable[[TuningConfig], TuningMethod]] = {
    "full": FullTuning,
    "lora": partial(PeftTuning, kind="lora"),
    "loha": partial(PeftTuning, kind="loha"),
    "lokr": partial(PeftTuning, kind="lokr"),
    "bitfit": BitFitTuning,
    "difffit": DiffFitTuning,
    "adaptformer": AdaptFormerTuning,
    "vpt": VPTTuning,
    "svdiff": SVDiffTuning,
}


def build_tuning(name: str, settings: TuningConfig | None = None) -> TuningMethod:
    """The tuning method registered as ``name``, with ``settings`` (defaults when ``None``).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
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
