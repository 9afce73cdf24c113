"""Backbone adapters over diffusers models, their families (loading, conditions, saving), and loading
from the hub or a local directory."""

from difftune.backbones.adapters import apply_tuning, load_adapter, merged_model
from difftune.backbones.base import Backbone, ClassConditionalBackbone
from difftune.backbones.codec import LatentCodec
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.dit import DiTBackbone
from difftune.backbones.families import FAMILIES, register_family
from difftune.backbones.family import ConditionRequest, ModelFamily
from difftune.backbones.fingerprint import model_fingerprint
from difftune.backbones.loading import LoadedModel, load_pretrained
from difftune.backbones.saving import load_trained, save_model
from difftune.backbones.unet import UNetBackbone

__all__ = [
    "FAMILIES",
    "Backbone",
    "ClassConditionalBackbone",
    "ConditionRequest",
    "Conditioning",
    "DiTBackbone",
    "LatentCodec",
    "LoadedModel",
    "ModelFamily",
    "UNetBackbone",
    "apply_tuning",
    "load_adapter",
    "load_pretrained",
    "load_trained",
    "merged_model",
    "model_fingerprint",
    "register_family",
    "save_model",
]
