"""The registry of model families: one entry per family (:mod:`difftune.backbones.family`).

A new family is an adapter module, a family module and one :func:`register_family` call; nothing
outside ``backbones/`` changes. Registration refuses a family that leaves a hook unimplemented.

A diffusers class has at most one *default* family, which loads every config of it, and any number
of *narrower* families, which claim only some of its configs (:meth:`ModelFamily.claims`): SDXL's
``UNet2DConditionModel`` (``addition_embed_type="text_time"``) is the ``stable_diffusion_xl``
family's, every other one Stable Diffusion 1.x / 2.x's.
Likewise SDXL's ``ControlNetModel`` (``text_time``) is the ``sdxl_controlnet`` family's, every other
one the SD 1.x / 2.x ``controlnet`` family's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from difftune.backbones.class_family import DIT, UNET
from difftune.backbones.controlnet_families import FLUX_CONTROLNET, SD3_CONTROLNET, SDXL_CONTROLNET
from difftune.backbones.controlnet_family import CONTROLNET
from difftune.backbones.family import ModelFamily, missing_hooks, narrows
from difftune.backbones.flux_family import FLUX
from difftune.backbones.sd3_family import STABLE_DIFFUSION_3
from difftune.backbones.sd_family import STABLE_DIFFUSION
from difftune.backbones.sdxl_family import STABLE_DIFFUSION_XL
from difftune.errors import UserError

FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to :data:`FAMILIES` (by its name); returns it.

    Raises:
        TypeError: it leaves a hook to :class:`~difftune.backbones.family.ModelFamily`, states no name,
            classes, adapter or default adapter targets, or claims every config of a class another
            family already loads in full (a class has one default family; narrower ones override
            :meth:`~difftune.backbones.family.ModelFamily.claims`).
    """
    missing = missing_hooks(family)
    if missing:
        raise TypeError(f"model family {family.name or type(family).__name__!r} does not implement {missing}")
    if not narrows(family):
        taken = {
            name
            for other in FAMILIES.values()
            if other.name != family.name and not narrows(other)
            for name in other.model_classes
        }
        claimed = sorted(taken & set(family.model_classes))
        if claimed:
            raise TypeError(
                f"model family {family.name!r} claims {claimed}, which another family loads; a second family "
                "of a class must narrow it (override claims(config))"
            )
    FAMILIES[family.name] = family
    return family


def model_class_names() -> list[str]:
    """Every diffusers class name a registered family loads, sorted, each once."""
    return sorted({name for family in FAMILIES.values() for name in family.model_classes})


def family_for_config(config: Mapping[str, Any]) -> ModelFamily:
    """The family that loads a model of ``config`` (its ``config.json``): the narrower family of its
    class that claims it, else the class's default family.

    Raises:
        UserError: no family loads it (the message lists the supported classes).
        TypeError: two narrower families claim it (a registry fault, not the user's).
    """
    class_name = str(config.get("_class_name", ""))
    listing = [family for family in FAMILIES.values() if class_name in family.model_classes]
    narrower = [family for family in listing if narrows(family) and family.claims(config)]
    if len(narrower) > 1:
        raise TypeError(f"{class_name} config claimed by {[family.name for family in narrower]}")
    default = [family for family in listing if not narrows(family)]
    if narrower or default:
        return (narrower or default)[0]
    raise UserError(f"model class {class_name!r} is not supported; supported: {model_class_names()}")


def family_for_class(class_name: str) -> ModelFamily:
    """The default family of the diffusers class ``class_name`` (:func:`family_for_config` with no
    other config keys).

    Raises:
        UserError: no family loads it (the message lists the supported classes).
    """
    return family_for_config({"_class_name": class_name})


for _family in (
    DIT,
    UNET,
    STABLE_DIFFUSION,
    STABLE_DIFFUSION_XL,
    STABLE_DIFFUSION_3,
    FLUX,
    CONTROLNET,
    SDXL_CONTROLNET,
    SD3_CONTROLNET,
    FLUX_CONTROLNET,
):
    register_family(_family)
