"""Backbone adapters over diffusers models, and loading from the hub or a local directory."""

from difftune.backbones.adapters import apply_tuning, load_adapter, merged_model
from difftune.backbones.base import Backbone, ClassConditionalBackbone
from difftune.backbones.codec import LatentCodec
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.dit import DiTBackbone
from difftune.backbones.fingerprint import model_fingerprint
from difftune.backbones.loading import BACKBONES, LoadedModel, load_pretrained
from difftune.backbones.saving import load_trained, save_model
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
    "apply_tuning",
    "load_adapter",
    "load_pretrained",
    "load_trained",
    "merged_model",
    "model_fingerprint",
    "save_model",
]
