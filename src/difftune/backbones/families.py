"""The registry of model families: one entry per family (:mod:`difftune.backbones.family`).

A new family is an adapter module, a family module and one :func:`register_family` call; nothing
outside ``backbones/`` changes. Registration refuses a family that leaves a hook unimplemented.
"""

from __future__ import annotations

from difftune.backbones.class_family import DIT, UNET
from difftune.backbones.controlnet_family import CONTROLNET
from difftune.backbones.family import ModelFamily, missing_hooks
from difftune.backbones.sd_family import STABLE_DIFFUSION
from difftune.errors import UserError

FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to :data:`FAMILIES` (by its name); returns it.

    Raises:
        TypeError: it leaves a hook to :class:`~difftune.backbones.family.ModelFamily`, states no name,
            classes, adapter or default adapter targets, or claims a class another family loads.
    """
    missing = missing_hooks(family)
    if missing:
        raise TypeError(f"model family {family.name or type(family).__name__!r} does not implement {missing}")
    taken = {name for other in FAMILIES.values() if other.name != family.name for name in other.model_classes}
    claimed = sorted(taken & set(family.model_classes))
    if claimed:
        raise TypeError(f"model family {family.name!r} claims {claimed}, which another family loads")
    FAMILIES[family.name] = family
    return family


def model_class_names() -> list[str]:
    """Every diffusers class name a registered family loads, sorted."""
    return sorted(name for family in FAMILIES.values() for name in family.model_classes)


def family_for_class(class_name: str) -> ModelFamily:
    """The family that loads the diffusers class ``class_name`` (``_class_name`` in ``config.json``).

    Raises:
        UserError: no family loads it (the message lists the supported classes).
    """
    for family in FAMILIES.values():
        if class_name in family.model_classes:
            return family
    raise UserError(f"model class {class_name!r} is not supported; supported: {model_class_names()}")


for _family in (DIT, UNET, STABLE_DIFFUSION, CONTROLNET):
    register_family(_family)
