"""Backbone adapters over diffusers models, and loading from the hub or a local directory."""

from difftune.backbones.base import Backbone, ClassConditionalBackbone
from difftune.backbones.codec import LatentCodec
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.dit import DiTBackbone
from difftune.backbones.fingerprint import model_fingerprint
from difftune.backbones.loading import (
    BACKBONES,
    LoadedModel,
    load_pretrained,
    load_trained,
    save_model,
)
from difftune.backbones.unet import UNetBackbone

__all__ = [
    "BACKBONES",
    "Backbone",
    "ClassConditionalBackbone",
    "Conditioning",
    "DiTBackbone",
    "LatentCodec",
    "LoadedModel",
    "UNetBackbone",
    "load_pretrained",
    "load_trained",
    "model_fingerprint",
    "save_model",
]
