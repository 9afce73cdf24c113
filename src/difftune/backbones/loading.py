"""Load a pre-trained model (hub id or local directory) through the family of its diffusers class.

A "model directory" is either a diffusers pipeline (``model_index.json`` with a ``transformer``
or ``unet`` component, optionally ``vae`` and ``scheduler``), a directory with those sub-folders
(what difftune writes), or a single model directory (``config.json`` + weights).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DiTTransformer2DModel

from difftune.backbones.base import Backbone
from difftune.backbones.codec import LatentCodec
from difftune.backbones.families import family_for_config
from difftune.backbones.family import LoadContext, ModelFamily
from difftune.backbones.fingerprint import model_fingerprint
from difftune.backbones.noise_schedule import read_noise_schedule
from difftune.config.checks import check_model_path
from difftune.errors import UserError
from difftune.io.log_filters import dropping_messages
from difftune.tuning.record import TuningRecord

if TYPE_CHECKING:
    from difftune.process.base import ForwardProcess

SOURCE_FILE = "difftune_source.json"


@dataclass
class LoadedModel:
    """A pre-trained model ready for Diff-Tuning.

    Attributes:
        backbone: the adapter around the diffusers model.
        codec: VAE codec (latent space) or identity (pixel space).
        scheduler_config: the noise schedule: the keys its scheduler config states, or difftune's
            default for a model without one (:mod:`difftune.backbones.noise_schedule`); training
            and sampling schedulers are built from it, and saving writes it back unchanged.
        source: where it came from (hub id or path), recorded in banks and checkpoints.
        vae_source: where the VAE came from, or ``None``.
        vae_subfolder: the VAE's sub-folder inside ``vae_source``, or ``None``.
        tuning: the tuning method applied to the backbone, once one is
            (:func:`~difftune.backbones.adapters.apply_tuning`).
        weights: ``(path or hub id, sub-folder)`` the backbone's weights were read from (``source``
            is where they came from originally, which a difftune directory records).
        parts: what the model's family keeps beside the denoiser (a text model's text encoder, a
            ControlNet's frozen UNet, ...), or ``None``; only the family's hooks read it.
    """

    backbone: Backbone
    codec: LatentCodec
    scheduler_config: dict[str, Any]
    source: str
    vae_source: str | None
    vae_subfolder: str | None = None
    tuning: TuningRecord | None = None
    weights: tuple[str, str | None] = ("", None)
    parts: Any = None

    @property
    def family(self) -> ModelFamily:
        """The model's family (:mod:`difftune.backbones.family`): its loading, conditions and saving."""
        return self.backbone.family

    def fingerprint(self) -> str:
        """The fingerprint of the pre-trained weights (taken before a parameter-efficient method
        changed the model, once one is applied): what banks record and check."""
        source = self.backbone.source_model
        if source is self.backbone.inner and self.tuning is not None and self.tuning.adapter:
            return self.tuning.base_fingerprint
        return model_fingerprint(source)

    def forward_process(self, pretraining_density: str = "auto") -> tuple[ForwardProcess, str]:
        """The model's forward process (from its scheduler) and ``model.pretraining_density`` made
        concrete (``auto``: the family's), which the process samples plain fine-tuning's t with."""
        from difftune.process import build_process, resolve_pretraining

        density = resolve_pretraining(
            pretraining_density, self.scheduler_config, self.family.pretraining_density
        )
        return build_process(self.scheduler_config, self.backbone.sample_shape, density), density

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LoadedModel:
        """Move the modules that sample, the backbone (with a ControlNet's frozen UNet) and the VAE, to
        ``device``, and cast them to ``dtype`` unless it is ``None`` (``--dtype``: bfloat16 or float16
        inference). Their callers cast what enters them (:func:`~difftune.sampling.generate.generate`, the
        adapters and :class:`~difftune.backbones.codec.LatentCodec`) and give float32 back.

        The family's :attr:`parts` (a text encoder) stay as loaded, float32 on the CPU: prompts are
        encoded there once, before sampling, and their embeddings are cast where they enter the model.
        """
        self.backbone.to(device=device, dtype=dtype)  # an nn.Module: None keeps the dtypes
        self.codec.to(device, dtype)
        return self


def _pipeline_components(pretrained: str, revision: str | None, local_only: bool = False) -> dict[str, Any]:
    """Component names of a pipeline (local or hub), or {} when it is not a pipeline."""
    local = Path(pretrained)
    if local.is_dir():
        if (local / "model_index.json").is_file():
            return json.loads((local / "model_index.json").read_text())
        names = ("controlnet", "transformer", "unet", "vae", "scheduler", "text_encoder", "tokenizer")
        return {name: None for name in names if (local / name).is_dir()}
    try:
        return DiffusionPipeline.load_config(pretrained, revision=revision, local_files_only=local_only)
    except Exception:  # not a pipeline repo: a single-model repo
        return {}


def _resolve_subfolder(pretrained: str, subfolder: str | None, components: dict[str, Any]) -> str | None:
    if subfolder is not None:
        return subfolder or None
    for name in ("controlnet", "transformer", "unet"):
        if name in components:
            return name
    local = Path(pretrained)
    if local.is_dir() and not (local / "config.json").is_file():
        if (local / "final").is_dir():  # a run's folder: its model is final/
            raise FileNotFoundError(f"{pretrained!r} is a run's folder; give its model, {local / 'final'}")
        raise FileNotFoundError(
            f"no diffusers model in {pretrained!r}: expected config.json, or a transformer/, unet/ or "
            "controlnet/ sub-folder"
        )
    return None


def _refuse_ignored_controlnet(
    pretrained: str, subfolder: str | None, found: str | None, controlnet: str | None
) -> None:
    """Refuse ``model.controlnet`` over a folder whose own ControlNet would be loaded instead (a ControlNet
    pipeline, or a ControlNet run's ``final/``: its ``controlnet/`` is found first), unless it is that one."""
    if controlnet is None or subfolder is not None or found != "controlnet":
        return
    own = Path(pretrained) / "controlnet"
    if not (own.is_dir() and Path(controlnet).resolve() == own.resolve()):
        raise UserError(
            f"{pretrained} holds a ControlNet of its own (controlnet/), which would be trained instead of "
            f"model.controlnet={controlnet}: give the base model's folder (model.subfolder: unet or transformer) "
            "or remove model.controlnet"
        )


def _source_record(pretrained: str) -> dict[str, Any]:
    path = Path(pretrained) / SOURCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


@contextlib.contextmanager
def _without_fetch_errors() -> Iterator[None]:
    """diffusers logs a missing safetensors file as an error before raising it; difftune reports it itself."""
    with dropping_messages("diffusers.models.modeling_utils", "An error occurred while trying to fetch"):
        yield


@contextlib.contextmanager
def _without_loading_bars(cls: type) -> Iterator[None]:
    """No "Loading weights" (transformers) or "Loading checkpoint shards" (diffusers) bar while ``cls``
    loads: one per model in every command, noise. Each library's setting is restored afterwards, and the
    hub's download bars (which transformers switches with its own) keep theirs throughout."""
    import huggingface_hub.utils as hub
    from diffusers.utils import logging as diffusers_logging

    libraries = [diffusers_logging]
    if cls.__module__.startswith("transformers."):  # transformers is imported only for its models
        from transformers.utils import logging as transformers_logging

        libraries.append(transformers_logging)
    shown = [library.is_progress_bar_enabled() for library in libraries]
    downloads_shown = not hub.are_progress_bars_disabled()
    for library in libraries:
        library.disable_progress_bar()
    try:
        if downloads_shown:
            hub.enable_progress_bars()
        yield
    finally:
        for library, was_shown in zip(libraries, shown, strict=True):
            if was_shown:
                library.enable_progress_bar()
        if not downloads_shown:
            hub.disable_progress_bars()


def load_safetensors_model(cls: type, source: str, subfolder: str | None, revision: str | None) -> Any:
    """``cls.from_pretrained`` that reads safetensors weights only: a pickle (``.bin``) file can run code.

    Raises:
        UserError: only pickle weights are there; the message says how to convert them.
    """
    try:
        with _without_fetch_errors(), _without_loading_bars(cls):
            return cls.from_pretrained(source, subfolder=subfolder, revision=revision, use_safetensors=True)
    except OSError as err:
        if "safetensors" not in str(err):
            raise
        raise _pickle_refusal(cls, f"{source}/{subfolder}" if subfolder else source) from None


def _pickle_refusal(cls: type, where: str) -> UserError:
    return UserError(
        f"{where} has no safetensors weights, and difftune does not load pickle (.bin) weights, which can "
        f"run code; if you trust the file, convert it once: {cls.__name__}.from_pretrained("
        f"{where!r}, use_safetensors=False).save_pretrained(NEW_DIR)"
    )


def _model_config(
    pretrained: str, subfolder: str | None, revision: str | None, local_only: bool = False
) -> tuple[dict[str, Any], str | None, dict[str, Any], ModelFamily]:
    """(pipeline components, model sub-folder, model config, the family that loads it).

    With ``local_only`` a hub model is read from the local cache only (no network).
    """
    check_model_path(pretrained)
    components = _pipeline_components(pretrained, revision, local_only)
    sub = _resolve_subfolder(pretrained, subfolder, components)
    try:
        config = DiTTransformer2DModel.load_config(
            pretrained, subfolder=sub, revision=revision, local_files_only=local_only
        )
    except OSError as err:
        raise FileNotFoundError(
            f"cannot read a model config from {pretrained!r}: {str(err).splitlines()[0]}"
        ) from None
    return components, sub, config, family_for_config(config)


def peek_backbone(
    pretrained: str,
    subfolder: str | None = None,
    revision: str | None = None,
    local_only: bool = False,
    controlnet: str | None = None,
) -> Backbone:
    """The backbone adapter of a model built from its config alone, on the ``meta`` device: its
    classes, sample shape and variance are known without reading (or downloading) any weights.

    Raises:
        FileNotFoundError: no model config there (with ``local_only``: not in the local hub cache either).
        UserError: a local model has pickle weights only (loading it would be refused).
    """
    components, sub, config, family = _model_config(pretrained, subfolder, revision, local_only)
    _refuse_ignored_controlnet(pretrained, subfolder, sub, controlnet)
    local = Path(pretrained) / (sub or "")
    if local.is_dir() and not any(local.glob("*.safetensors")) and any(local.glob("*.bin")):
        # what loading would refuse, found from the listing
        raise _pickle_refusal(family.model_class, str(local))
    record = _source_record(pretrained)
    ctx = LoadContext(
        pretrained, sub, revision, components, record, config, controlnet, local_only=local_only
    )
    with torch.device("meta"):
        return family.peek(ctx, family.model_class.from_config(config))


def load_pretrained(
    pretrained: str,
    subfolder: str | None = None,
    vae: str | None = None,
    revision: str | None = None,
    controlnet: str | None = None,
    vae_subfolder: str | None = None,
    guidance: float | None = None,
) -> LoadedModel:
    """Load a model of a registered family (DiT, UNet2DModel, a Stable Diffusion UNet, optionally
    with a ControlNet) with its VAE, the parts its family keeps (a text encoder, a frozen UNet) and
    its noise schedule.

    Args:
        pretrained: hub id or local directory.
        subfolder: model sub-folder; ``None`` finds ``controlnet``, ``transformer`` or ``unet``;
            ``""`` = root.
        vae: hub id / directory of an ``AutoencoderKL``; ``None`` uses the pipeline's own VAE (or,
            for a difftune checkpoint, the VAE it was trained with).
        revision: hub revision.
        controlnet: train a ControlNet over the Stable Diffusion UNet of ``pretrained``:
            ``"from_unet"`` makes a new one from the UNet's weights, else a ControlNet's hub id or
            directory; ``None`` for none.
        vae_subfolder: the sub-folder of ``vae`` that holds it (a pipeline's ``vae/``).
        guidance: the guidance embedding's value of a guidance-distilled model (Flux.1-dev,
            ``model.guidance``); ``None``: what a saved model records, else the family's default.

    Raises:
        FileNotFoundError: the path holds no diffusers model.
        ValueError: the model class is not supported (the message lists supported classes).
    """
    components, sub, config, family = _model_config(pretrained, subfolder, revision)
    _refuse_ignored_controlnet(pretrained, subfolder, sub, controlnet)
    record = _source_record(pretrained)
    if vae is not None:  # a typo costs one line, not the model's loading first
        check_model_path(vae, "vae")
    model = load_safetensors_model(family.model_class, pretrained, sub, revision)
    vae_source = vae
    vae_sub: str | None = vae_subfolder if vae is not None else None
    if vae_source is None and "vae" in components:
        vae_source, vae_sub = pretrained, "vae"
    elif vae_source is None and record.get("vae"):
        vae_source, vae_sub = record["vae"], record.get("vae_subfolder")
    vae_model = load_safetensors_model(AutoencoderKL, vae_source, vae_sub, revision) if vae_source else None
    if vae is None and record.get("vae"):
        # a difftune directory with a copy of its VAE: the copy's weights, the original's name (cache keys)
        vae_source, vae_sub = record["vae"], record.get("vae_subfolder")

    codec = LatentCodec(vae_model, vae_source)
    ctx = LoadContext(
        pretrained,
        sub,
        revision,
        components,
        record,
        config,
        controlnet,
        codec.downsample,
        load_safetensors_model,
        guidance=guidance,
        vae=vae_model,
    )
    backbone, parts = family.load(ctx, model)
    if guidance is not None and "guidance" not in backbone.condition_names:
        raise UserError(
            f"model.guidance is set but {pretrained} has no guidance embedding (only a guidance-distilled "
            "model such as Flux.1-dev reads it): remove model.guidance"
        )
    scheduler_config = read_noise_schedule(pretrained, sub, "scheduler" in components, revision)
    return LoadedModel(
        backbone=backbone,
        codec=codec,
        scheduler_config=scheduler_config,
        source=record.get("source", pretrained),
        vae_source=vae_source,
        vae_subfolder=vae_sub,
        weights=(pretrained, sub),
        parts=parts,
    )
