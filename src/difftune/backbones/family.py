"""The family seam: one object per model family owns what differs between families.

A family (class-conditional DiT, class-conditional UNet, Stable Diffusion, SDXL, a ControlNet over
Stable Diffusion) is registered once (:mod:`difftune.backbones.families`) and owns:

* its loading: the parts besides the denoiser (text encoder, frozen UNet, where a ControlNet starts)
  that it keeps in ``LoadedModel.parts``, what a saved model's ``difftune_source.json`` records about
  them, and what an adapter's base record needs to reload them;
* its conditioner: condition bundles from class labels, captions or prompts and control images
  (targets, the knowledge bank, sampling, the forgetting probes), and the checks that go with them;
* its default adapter targets (the modules LoRA and SVDiff adapt unless told otherwise);
* what its stock pipeline index (``model_index.json``) and its model card say.

The unconditional form and the guidance drop stay on the backbone adapter
(:class:`~difftune.backbones.base.Backbone`), which the family names (``family.adapter``); every
adapter class points back at its family (``Backbone.family``). Code outside ``backbones/`` asks the
family (``loaded.family`` or ``backbone.family``) and never tests which family it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from difftune.backbones.conditioning import Conditioning
from difftune.errors import UserError

# every hook a family implements; :func:`missing_hooks` checks them at registration
HOOKS = (
    "load",
    "peek",
    "source_record",
    "tuning_base",
    "check_tuning",
    "check_request",
    "sample_conditions",
    "heldout_conditions",
    "target_conditioner",
    "prepare_bank",
    "check_bank",
    "grid_conditions",
    "preflight_lines",
    "has_control",
    "control_images",
    "pipeline_parts",
    "pipeline_extras",
    "sample_flags",
    "card_notes",
    "save_lora",
)
ADAPTER_TARGET_KEYS = ("lora", "svdiff")  # the methods a family names default target modules for
LABEL_BANK = ["labels"]  # what a bank without recorded condition names holds (class-conditional banks)
CARD_FOLDER = "THIS_FOLDER"  # a saved model's path in the code lines of its model card


def absolute_source(source: str | None) -> str | None:
    """A local path made absolute (a saved record is read from anywhere); a hub id as it is."""
    return str(Path(source).resolve()) if source and Path(source).exists() else source


@dataclass
class LoadContext:
    """What a family's loader gets besides the denoiser's own weights.

    Attributes:
        pretrained: the hub id or directory given.
        subfolder: the denoiser's sub-folder in it (``None`` = root).
        revision: hub revision.
        components: the pipeline's components (``model_index.json`` or the sub-folders found).
        record: the directory's ``difftune_source.json`` (``{}`` when it has none).
        config: the denoiser's config.
        controlnet: ``model.controlnet`` (``from_unet``, a ControlNet's path or hub id, or ``None``).
        downsample: the codec's downsampling factor (1 in pixel space).
        load: ``(cls, source, subfolder, revision) -> model``, the safetensors-only ``from_pretrained``.
        local_only: read hub configs from the local cache only (:func:`peek_backbone`).
        guidance: ``model.guidance``, the guidance embedding's value of a guidance-distilled model
            (Flux.1-dev); ``None``: what the saved model records, else the family's default.
        vae: the model's VAE (``None`` in pixel space and on the meta device): an SD3 ControlNet encodes
            its control images with it.
    """

    pretrained: str
    subfolder: str | None
    revision: str | None
    components: dict[str, Any]
    record: dict[str, Any]
    config: dict[str, Any]
    controlnet: str | None = None
    downsample: int = 8
    load: Callable[..., Any] | None = None
    local_only: bool = False
    guidance: float | None = None
    vae: Any = None


@dataclass(frozen=True)
class ConditionRequest:
    """What a user asks to sample: class labels, or prompts (with a ControlNet's control image files).

    Attributes:
        labels: class labels; ``None`` for every class of the model.
        prompts: prompts, for a text-conditional model.
        controls: control image files: one for all prompts, or one per prompt.
        model: the model as the user named it (in messages).
        prompt_flag: the flag that gives prompts in the command at hand (in messages).
    """

    labels: Sequence[int] | None = None
    prompts: Sequence[str] = ()
    controls: Sequence[str] = ()
    model: str = ""
    prompt_flag: str = "--prompt"


def named(request: ConditionRequest, loaded: Any) -> ConditionRequest:
    """``request``, naming the model by where its weights were read when the caller did not name it."""
    return request if request.model else replace(request, model=loaded.weights[0] or loaded.source)


@dataclass
class BankInputs:
    """What a family may need to make its knowledge bank's conditions, each read only when asked for.

    Attributes:
        prompts: the bank's prompts (``bank.prompts``, or the target's captions).
        annotator: the annotator that makes control images from the bank's samples (refuses when unset).
    """

    prompts: Callable[[], list[str]]
    annotator: Callable[[], Any]


class TargetSource(Protocol):
    """A target image set as a family's conditioner reads it.

    Attributes:
        labels: (N,) class labels.
        has_controls: the data brings its own control images.
        has_crops: the images are a bucket's (``data.buckets``): each was resized to cover the bucket's
            size and centre-cropped, and :meth:`crops` says how.
    """

    labels: torch.Tensor
    has_controls: bool
    has_crops: bool

    def captions(self) -> list[str]:
        """The images' captions (their own, or the caption template filled with their class names)."""
        ...

    def annotator(self) -> Any:
        """The annotator that makes control images from the images (``data.annotator``), or ``None``."""
        ...

    def controls(self, indices: torch.Tensor, flipped: bool) -> torch.Tensor:
        """The data's own control images of ``indices`` in [0, 1] (mirrored if ``flipped``)."""
        ...

    def crops(self, indices: torch.Tensor, flipped: bool) -> torch.Tensor:
        """(n, 4) int64 with ``has_crops``: each image's original (height, width) and its crop's (top, left)
        in the resized image's pixels (of the mirror if ``flipped``)."""
        ...


class TargetConditioner(Protocol):
    """The conditions of target images, chunk by chunk, computed once with their latents.

    Attributes:
        identity: what keys the target cache besides the images (``None``: labels only).
    """

    identity: str | None

    def __call__(self, indices: torch.Tensor, images: torch.Tensor, flipped: bool) -> dict[str, torch.Tensor]:
        """The conditions of images ``indices`` (``images``: their pixels in [-1, 1], mirrored if ``flipped``)."""
        ...


@dataclass
class PreflightFacts:
    """What ``train --dry-run`` knows of the target before the family describes the fit.

    Attributes:
        classes: the target's class (or image) count.
        target_line: how the target is conditioned, in words.
        control_line: where control images come from (refuses when nowhere).
    """

    classes: int
    target_line: Callable[[], str]
    control_line: Callable[[], str]


def check_bank_names(manifest: dict[str, Any], backbone: Any, path: str) -> None:
    """Refuse a bank that lacks a condition the model needs (a bank without names holds labels).

    Raises:
        UserError: the message names what the bank holds and how to make a matching one.
    """
    held = manifest.get("conditions", LABEL_BANK)
    missing = [name for name in backbone.condition_names if name not in held]
    if missing:
        raise UserError(
            f"bank {path} holds {held} but the model needs {list(backbone.condition_names)}; regenerate the "
            "bank with this config (difftune bank)"
        )


def no_controlnet(model: str) -> UserError:
    """The refusal of control images for a model that has no ControlNet."""
    return UserError(
        f"{model} has no ControlNet, so --control-image would be ignored; leave it out, or give a "
        "ControlNet model (a ControlNet run's final/ or pipeline) as --model"
    )


def model_line(backbone: Any, rest: str) -> str:
    """The dry run's model line: the diffusers class, the sample shape, then ``rest``."""
    return f"model      {type(backbone.inner).__name__}, samples {tuple(backbone.sample_shape)}, {rest}"


class ModelFamily:
    """One model family: every hook of :data:`HOOKS` raises here; a family implements them all.

    Attributes:
        name: the family's name (the registry key).
        model_classes: the diffusers class names (``_class_name`` in ``config.json``) it loads (every
            config of them, or those :meth:`claims` accepts).
        model_class: the diffusers class its denoiser is loaded as.
        adapter: the backbone adapter class it builds.
        adapter_targets: method (:data:`ADAPTER_TARGET_KEYS`) -> the module names it adapts by default.
        pretraining_density: the density over the noise level a flow model of the family was pre-trained
            with, what ``model.pretraining_density: auto`` resolves to (``uniform`` or ``logit_normal``).
    """

    name: str = ""
    model_classes: tuple[str, ...] = ()
    model_class: type
    adapter: type
    adapter_targets: Mapping[str, Sequence[str]] = {}
    pretraining_density: str = "uniform"

    def claims(self, config: Mapping[str, Any]) -> bool:
        """Whether this family loads a model of one of :attr:`model_classes` with ``config`` (its
        ``config.json``). The *default* family of a class (which does not override this) loads every
        config of it; a *narrower* family overrides it to claim only its own configs (SDXL: the
        ``UNet2DConditionModel`` configs with ``addition_embed_type="text_time"``), and the registry
        asks the narrower families of a class first (:func:`~difftune.backbones.families.family_for_config`)."""
        return True

    # loading
    def load(self, ctx: LoadContext, model: Any) -> tuple[Any, Any]:
        """``(backbone, parts)`` around the loaded denoiser ``model``: parts are what ``LoadedModel.parts`` keeps."""
        raise NotImplementedError

    def peek(self, ctx: LoadContext, model: Any) -> Any:
        """The backbone around ``model`` built on the meta device, reading configs only."""
        raise NotImplementedError

    def source_record(self, parts: Any) -> dict[str, Any]:
        """What ``difftune_source.json`` records about ``parts`` (the loader reads it back)."""
        raise NotImplementedError

    def tuning_base(self, parts: Any) -> dict[str, Any]:
        """The load options an adapter's base record keeps to reload ``parts`` (``load_pretrained`` keywords)."""
        raise NotImplementedError

    def check_tuning(self, parts: Any, adapter: bool) -> None:
        """Refuse a tuning method these parts cannot be saved with (``adapter``: saved apart from the base)."""
        raise NotImplementedError

    # conditions
    def check_request(self, request: ConditionRequest) -> None:
        """Refuse sampling inputs this family cannot take, before any weights are read."""
        raise NotImplementedError

    def sample_conditions(self, loaded: Any, request: ConditionRequest) -> tuple[Conditioning, list[str]]:
        """One condition per label or prompt asked for, and a tag for each (in file names)."""
        raise NotImplementedError

    def heldout_conditions(
        self, loaded: Any, labels: torch.Tensor, num_classes: int, request: ConditionRequest
    ) -> Conditioning:
        """The conditions of held-out images of classes ``labels`` (N,) out of ``num_classes``."""
        raise NotImplementedError

    def target_conditioner(self, loaded: Any, source: TargetSource) -> TargetConditioner:
        """The conditioner of a target set (checks that the set fits the model)."""
        raise NotImplementedError

    def prepare_bank(self, loaded: Any, inputs: BankInputs) -> None:
        """Give the backbone what its bank conditions need (prompts, an annotator)."""
        raise NotImplementedError

    def check_bank(
        self, manifest: dict[str, Any], backbone: Any, annotator: Callable[[], Any], path: str
    ) -> None:
        """Refuse a bank whose conditions the model cannot train on (``annotator``: the target's record)."""
        raise NotImplementedError

    def grid_conditions(self, target_cond: Conditioning) -> Conditioning:
        """The rows of a training run's sample grid, from the target's conditions."""
        raise NotImplementedError

    def preflight_lines(self, backbone: Any, facts: PreflightFacts) -> list[str]:
        """The dry run's lines about the model and how the target fits it (refuses a target that does not)."""
        raise NotImplementedError

    def has_control(self) -> bool:
        """The model follows control images (condition fidelity can be measured)."""
        raise NotImplementedError

    def control_images(self, cond: Conditioning) -> torch.Tensor:
        """The control images of ``cond`` in [0, 1]."""
        raise NotImplementedError

    # saved models
    def pipeline_parts(self, loaded: Any) -> dict[str, Any]:
        """The parts besides the VAE that a stock pipeline needs beside the trained weights."""
        raise NotImplementedError

    def pipeline_extras(self, loaded: Any, class_names: list[str]) -> dict[str, Any]:
        """The entries of ``model_index.json`` after its components."""
        raise NotImplementedError

    def sample_flags(self, loaded: Any) -> str:
        """The condition flags of ``difftune sample`` in the model card."""
        raise NotImplementedError

    def card_notes(self, loaded: Any, directory: Path) -> list[str]:
        """Extra model-card sections (lines), or none."""
        raise NotImplementedError

    def save_lora(self, model: Any, directory: Path) -> None:
        """Write the LoRA of the denoiser ``model`` (peft layers injected) into the adapter ``directory`` in
        the layout the family's stock diffusers loader reads; nothing where peft's format is that loader."""
        raise NotImplementedError


def narrows(family: ModelFamily) -> bool:
    """``family`` claims only some configs of its classes (it overrides :meth:`ModelFamily.claims`)."""
    return type(family).claims is not ModelFamily.claims


def missing_hooks(family: ModelFamily) -> list[str]:
    """The hooks of :data:`HOOKS` ``family`` leaves to :class:`ModelFamily`, and the facts it does not state."""
    cls = type(family)
    missing = [hook for hook in HOOKS if getattr(cls, hook) is getattr(ModelFamily, hook)]
    facts = {
        "name": bool(family.name),
        "model_classes": bool(family.model_classes),
        "model_class": hasattr(family, "model_class"),
        "adapter": hasattr(family, "adapter"),
        "adapter_targets": set(family.adapter_targets) == set(ADAPTER_TARGET_KEYS),
    }
    return missing + [name for name, stated in facts.items() if not stated]
