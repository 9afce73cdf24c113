"""Saved models: trained weights (or an adapter) written for stock diffusers and for difftune, and read back.

A saved model directory holds ``<transformer|unet>/`` (full fine-tuning) or ``adapter/`` (a
parameter-efficient method, :mod:`difftune.backbones.adapters`), the same under ``ema/`` for the
EMA weights, ``scheduler/`` and ``difftune_source.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from difftune.backbones.adapters import ADAPTER, adapter_directory, load_adapter, save_adapter
from difftune.backbones.loading import SOURCE_FILE, LoadedModel, load_pretrained
from difftune.backbones.model_card import write_model_card
from difftune.backbones.noise_schedule import scheduler_class_name, write_noise_schedule
from difftune.io.atomic import atomic_directory
from difftune.process import process_name
from difftune.tuning import trainable_parameters


def load_trained(
    path: str, subfolder: str | None = None, use_ema: bool = True, vae: str | None = None
) -> LoadedModel:
    """Load a model for inference: EMA weights (``ema/<name>``) when a difftune directory has them.

    A directory that holds an adapter (``adapter/``, ``ema/adapter/``) is loaded onto the base model
    it records.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        UserError: an adapter whose base model has other weights.
    """
    adapter = adapter_directory(path, use_ema and subfolder is None)  # a run's, or one exported alone
    if adapter is not None:
        return load_adapter(adapter)
    return load_pretrained(path, inference_subfolder(path, subfolder, use_ema), vae)


def inference_subfolder(path: str, subfolder: str | None = None, use_ema: bool = True) -> str | None:
    """``subfolder`` if given, else ``ema/<name>`` when ``path`` has EMA weights and ``use_ema``, else None."""
    ema = Path(path) / "ema"
    if subfolder is None and use_ema and ema.is_dir():
        subfolder = next((f"ema/{p.name}" for p in sorted(ema.iterdir()) if p.is_dir()), None)
    return subfolder


def save_model(loaded: LoadedModel, directory: str | os.PathLike, ema: EMAModel | None = None) -> None:
    """Write a directory that stock diffusers and :func:`load_pretrained` both load.

    Layout: ``<transformer|unet>/`` (the trained weights; ``adapter/`` instead for a
    parameter-efficient method), ``ema/<transformer|unet>/`` (or ``ema/adapter/``; with ``ema``:
    the model with the EMA's averages in place of its trainable parameters; frozen ones as they
    are), ``scheduler/``, and ``difftune_source.json`` (where the model and its VAE came from).
    Written into a temporary sibling and renamed, so a crash never leaves a half-written directory.

    Args:
        loaded: the model, whole (backbone, schedule, provenance).
        directory: where to write.
        ema: the EMA of the backbone's trainable parameters
            (:func:`~difftune.tuning.trainable_parameters`, in that order), or ``None``.

    Raises:
        ValueError: ``ema`` does not hold one average per trainable parameter.
    """
    backbone = loaded.backbone
    with atomic_directory(directory) as tmp:
        save_weights(loaded, tmp)
        if ema is not None:
            params = trainable_parameters(backbone)  # the optimizer's and the EMA's list
            if len(params) != len(ema.shadow_params):
                raise ValueError(
                    f"the EMA holds {len(ema.shadow_params)} averages but the model has {len(params)} trainable "
                    "parameters; build the EMA from difftune.tuning.trainable_parameters(backbone)"
                )
            with ema_weights(ema, params):
                save_weights(loaded, tmp / "ema")
        write_noise_schedule(loaded.scheduler_config, tmp / "scheduler")
        record = {"source": loaded.source, "vae": loaded.vae_source, "vae_subfolder": loaded.vae_subfolder}
        record.update(loaded.family.source_record(loaded.parts))  # where the family's parts are read from
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2))


def save_weights(loaded: LoadedModel, root: Path) -> None:
    """Write the backbone's weights as they are now into ``root``: ``<transformer|unet>/``, or
    ``adapter/`` for a parameter-efficient method (the part of :func:`save_model` that its ``ema/``
    repeats with the averages in place)."""
    backbone = loaded.backbone
    if loaded.tuning is not None and loaded.tuning.adapter:
        save_adapter(loaded, root / ADAPTER)
    else:
        backbone.inner.save_pretrained(root / backbone.subfolder)


@contextlib.contextmanager
def ema_weights(ema: EMAModel | None, params: list[Any]) -> Iterator[None]:
    """Within the block, ``params`` hold the EMA's averages (as they are without an EMA); restored after.

    Sharded parameters (FSDP2's ``DTensor``) swap their local shards, one tensor at a time: the EMA's
    foreach copy has no sharding rule.
    """
    if ema is None:
        yield
        return
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        local = [t.to_local() if isinstance(t, DTensor) else t for t in (*params, *ema.shadow_params)]
        shards, averages = local[: len(params)], local[len(params) :]
        with torch.no_grad():
            kept = [shard.detach().to("cpu", copy=True) for shard in shards]
        try:
            with torch.no_grad():
                for shard, average in zip(shards, averages, strict=True):
                    shard.copy_(average)
            yield
        finally:
            with torch.no_grad():
                for shard, value in zip(shards, kept, strict=True):
                    shard.copy_(value)
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def save_pipeline_index(loaded: LoadedModel, directory: str | os.PathLike, class_names: list[str]) -> None:
    """Make a saved model directory self-describing: its class names, and a stock pipeline where one fits.

    Writes ``class_names.json`` and ``README.md`` (how to load it: :mod:`~difftune.backbones.model_card`)
    always. For a latent-space model whose adapter names a diffusers
    pipeline, also copies the parts the pipeline needs and writes ``model_index.json``, so that
    ``<Pipeline>.from_pretrained(directory)`` loads the trained weights (the EMA weights are in
    ``ema/<name>``):

    * DiT: ``DiTPipeline`` with ``vae/`` and ``id2label``;
    * Stable Diffusion: ``StableDiffusionPipeline`` with ``vae/``, ``text_encoder/`` and ``tokenizer/``;
    * SDXL: ``StableDiffusionXLPipeline`` with ``vae/``, both text encoders and both tokenizers;
    * SD3: ``StableDiffusion3Pipeline`` with ``vae/``, the three text encoders and their tokenizers;
    * ControlNet: ``StableDiffusionControlNetPipeline`` with those and the frozen ``unet/``.
    """
    directory = Path(directory)
    (directory / "class_names.json").write_text(json.dumps(class_names, indent=2) + "\n")
    backbone, codec = loaded.backbone, loaded.codec
    # an adapter becomes a stock pipeline through ``difftune export --merge``; a stock pipeline samples
    # the processes its adapter names (DiTPipeline, StableDiffusionPipeline: DDPM-family schedules only;
    # StableDiffusion3Pipeline: rectified flow)
    stock = process_name(loaded.scheduler_config) in backbone.pipeline_processes
    if (
        stock
        and backbone.pipeline_class
        and codec.vae is not None
        and not (loaded.tuning and loaded.tuning.adapter)
    ):
        _write_pipeline_index(loaded, directory, class_names)
    write_model_card(loaded, directory)


def _write_pipeline_index(loaded: LoadedModel, directory: Path, class_names: list[str]) -> None:
    """Copy the parts a stock pipeline needs beside the trained weights and write ``model_index.json``."""
    backbone, codec = loaded.backbone, loaded.codec
    import diffusers

    parts: dict[str, Any] = {"vae": codec.vae, **loaded.family.pipeline_parts(loaded)}
    for name, part in parts.items():
        part.save_pretrained(directory / name)
    index: dict[str, Any] = {
        "_class_name": backbone.pipeline_class,
        "_diffusers_version": diffusers.__version__,
        backbone.subfolder: ["diffusers", type(backbone.inner).__name__],
        "scheduler": ["diffusers", scheduler_class_name(loaded.scheduler_config)],
    }
    for name, part in parts.items():
        index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    index.update(loaded.family.pipeline_extras(loaded, class_names))
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
