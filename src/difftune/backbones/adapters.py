"""Parameter-efficient tuning on disk: an adapter saved alone, loaded back onto its base, merged.

An adapter directory holds ``difftune_adapter.safetensors`` (the method's trainable tensors, by
name in the diffusers model) and ``difftune_tuning.json`` (the method, its settings, and the
base: where it came from and the fingerprint of its weights). LoRA, LoHa and LoKr adapters are
also written in peft's format (``adapter_model.safetensors`` + ``adapter_config.json``), which
``peft.PeftModel.from_pretrained(base_model, directory)`` loads as it is; a LoRA of the Stable
Diffusion family also in diffusers' layout (:mod:`difftune.backbones.lora_layout`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from difftune.backbones.family import absolute_source
from difftune.backbones.fingerprint import model_fingerprint
from difftune.backbones.loading import LoadedModel, load_pretrained
from difftune.config.tuning import settings_from_record
from difftune.errors import UserError, shown_path
from difftune.tuning import Switchable, TuningConfig, build_tuning, trainable_parameters
from difftune.tuning.lora import ADAPTER_NAME, PeftTuning
from difftune.tuning.record import TuningRecord

ADAPTER = "adapter"  # the sub-folder of a saved model that holds an adapter
TUNING_FILE = "difftune_tuning.json"
RELATIVE = "relative"  # in the saved record's base: its local paths below the folder shared with the adapter
_PLACES = ("source", "vae", "controlnet")
logger = logging.getLogger(__name__)
ADAPTER_WEIGHTS = "difftune_adapter.safetensors"


def apply_tuning(
    loaded: LoadedModel,
    method: str,
    settings: TuningConfig | None = None,
    base_fingerprint: str | None = None,
) -> list[nn.Parameter]:
    """Prepare ``loaded``'s backbone for ``method`` and record it (with the base's fingerprint).

    Args:
        base_fingerprint: the base's fingerprint when the caller has it already (hashing a large
            model's weights takes seconds); computed otherwise.

    Returns:
        The trainable parameters, in module order.
    """
    settings = settings or TuningConfig()
    tuning = build_tuning(method, settings)
    loaded.family.check_tuning(loaded.parts, tuning.adapter)
    fingerprint = ""
    if tuning.adapter:
        fingerprint = base_fingerprint or model_fingerprint(loaded.backbone.inner)
    params = tuning.prepare(loaded.backbone)
    loaded.tuning = TuningRecord(
        method,
        dataclasses.asdict(settings),
        fingerprint,
        {
            "source": absolute_source(loaded.weights[0] or loaded.source),  # where these weights can be read
            "subfolder": loaded.weights[1],
            "vae": absolute_source(loaded.vae_source),
            "vae_subfolder": loaded.vae_subfolder,
            **loaded.family.tuning_base(loaded.parts),  # the load options that rebuild the family's parts
        },
        tuning.adapter,
    )
    return params


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``model`` (a diffusers model), by name: what an adapter file holds."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(loaded: LoadedModel, directory: Path) -> None:
    """Write the adapter of ``loaded`` (its trainable tensors and its tuning record) to ``directory``."""
    record = loaded.tuning
    if record is None or not record.adapter:
        raise ValueError(
            "save_adapter needs a model prepared by apply_tuning with a parameter-efficient method"
        )
    inner = loaded.backbone.inner
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(inner), str(directory / ADAPTER_WEIGHTS))
    saved = dataclasses.replace(
        record, base={**record.base, RELATIVE: _relative_places(record.base, directory)}
    )
    (directory / TUNING_FILE).write_text(json.dumps(dataclasses.asdict(saved), indent=2) + "\n")
    tuning = build_tuning(record.method, settings_from_record(record.method, record.settings))
    if isinstance(tuning, PeftTuning):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(inner, adapter_name=ADAPTER_NAME)
        save_file(
            {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()},
            str(directory / "adapter_model.safetensors"),
        )
        config = tuning.peft_config(inner, loaded.backbone.adapter_targets)
        config.base_model_name_or_path = record.base.get("source")
        config.save_pretrained(str(directory))
        if tuning.kind == "lora":  # diffusers' layout too, where the family's stock loader reads it
            loaded.family.save_lora(inner, directory)


def is_adapter(directory: str | Path) -> bool:
    """``directory`` is a saved model whose weights are an adapter (it has ``adapter/``)."""
    return (Path(directory) / ADAPTER / TUNING_FILE).is_file()


def read_record(directory: Path) -> TuningRecord:
    """The tuning record saved in an adapter ``directory``.

    Raises:
        UserError: it is missing or unreadable.
    """
    path = directory / TUNING_FILE
    try:
        record = TuningRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{path} cannot be read ({err}); save the adapter again") from None
    return dataclasses.replace(record, base=_located_base(record, directory))


def _relative_places(base: dict, directory: Path) -> dict[str, str]:
    """The local paths of ``base`` (source, VAE, ControlNet) below the folder they share with the
    adapter ``directory`` (``/p/base`` beside ``/p/run/final/adapter`` is ``base``): where to look
    for them, from the adapter upwards, once the run and its base have moved together."""
    here, places = directory.resolve(), {}
    for key in _PLACES:
        value = base.get(key)
        if value and Path(value).is_absolute() and Path(value).exists():
            shared = Path(os.path.commonpath([here, Path(value).resolve()]))
            if shared != Path(shared.anchor) and shared != Path(value).resolve():
                places[key] = str(Path(value).resolve().relative_to(shared))
    return places


def _located_base(record: TuningRecord, directory: Path) -> dict:
    """``record.base`` with each local path found where it is now: at its absolute place, else below
    the nearest folder above the adapter that holds it (the run and its base moved together; the
    base's fingerprint is checked when it is loaded).

    Raises:
        UserError: a local base path is at neither place.
    """
    base = {key: value for key, value in record.base.items() if key != RELATIVE}
    for key, below in (record.base.get(RELATIVE) or {}).items():
        if Path(str(base.get(key))).exists():
            continue
        found = next((up / below for up in directory.resolve().parents if (up / below).exists()), None)
        if found is None:
            raise UserError(
                f"the {key} this adapter was trained on (fingerprint {record.base_fingerprint}) is no longer "
                f"at {base.get(key)}, nor at {below} in a folder above {directory}; move it back, or load "
                "it and pass it: difftune.backbones.adapters.load_adapter(adapter, base)"
            )
        logger.warning(
            "%s: the base's %s is no longer at %s; using %s, found above the run (its fingerprint is checked)",
            shown_path(str(directory)),
            key,
            base.get(key),
            shown_path(str(found)),
        )
        base[key] = str(found)
    return base


def load_adapter(directory: str | Path, base: LoadedModel | None = None) -> LoadedModel:
    """The base model with the adapter in ``directory`` applied (the base it records, unless given).

    Raises:
        UserError: the base's weights are not the ones the adapter was trained on, or the adapter
            does not fit the model its method builds.
    """
    directory = Path(directory)
    record = read_record(directory)
    if base is None:
        source = record.base.get("source")
        if not source:
            raise UserError(f"{directory} does not record its base model; load the base and pass it")
        vae = record.base.get("vae")
        base = load_pretrained(
            source,
            record.base.get("subfolder"),
            vae=None if vae == source else vae,  # None: the pipeline's own VAE
            controlnet=record.base.get("controlnet"),
            vae_subfolder=record.base.get("vae_subfolder"),  # a pipeline's vae/ (a saved model's record)
            guidance=record.base.get("guidance"),  # a guidance-distilled base's value (Flux.1-dev)
        )
    found = model_fingerprint(base.backbone.inner)
    if found != record.base_fingerprint:
        raise UserError(
            f"the adapter in {directory} was trained on a base with fingerprint {record.base_fingerprint} "
            f"({record.base.get('source')}); {base.source} has {found}; load it onto that base"
        )
    apply_tuning(
        base, record.method, settings_from_record(record.method, record.settings), base_fingerprint=found
    )
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    params = dict(base.backbone.inner.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    if set(state) != trainable:
        odd = sorted(set(state) ^ trainable)[:3]
        raise UserError(
            f"the adapter in {directory} does not fit a {record.method} model of this base ({odd} differ); "
            "save it again with this version of difftune"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    return base


def adapter_directory(path: str | Path, use_ema: bool = False) -> Path | None:
    """The adapter folder of ``path``, or None: ``adapter/`` of a saved model (``ema/adapter/`` with
    ``use_ema`` when it has one), or ``path`` itself when it is an adapter."""
    path = Path(path)
    if is_adapter(path):
        ema = path / "ema" / ADAPTER
        return ema if use_ema and ema.is_dir() else path / ADAPTER
    return path if (path / TUNING_FILE).is_file() else None


def continue_adapter(
    path: str | Path, method: str, settings: TuningConfig
) -> tuple[LoadedModel, list[nn.Parameter]]:
    """The base with the trained (not EMA) adapter of ``path`` applied, to train it further.

    Raises:
        UserError: ``path`` holds another method's adapter, or one with other settings.
    """
    directory = adapter_directory(path)
    record = read_record(directory)
    if record.method != method or settings_from_record(record.method, record.settings) != settings:
        raise UserError(
            f"{path} holds a {record.method} adapter with settings {record.settings}; to train it further set "
            f"tuning.method={record.method} and the same tuning settings"
        )
    loaded = load_adapter(directory)
    return loaded, trainable_parameters(loaded.backbone)


def merged_model(model: nn.Module) -> nn.Module:
    """A new plain instance of the diffusers ``model``'s class with the tuning baked into its weights.

    LoRA-family updates are added to their base layers' weights, reparametrised weights (BitFit,
    DiffFit, SVDiff) are replaced by their values; the result has the stock class's modules and
    weight names, so ``save_pretrained`` writes a model stock diffusers loads. ``model`` is left as
    it is.

    Raises:
        UserError: the method adds modules a stock model does not have (AdaptFormer, VPT).
    """
    extra = [type(m).__name__ for m in model.modules() if isinstance(m, Switchable) and not m.reparametrises]
    if extra:
        raise UserError(
            f"this tuning adds {extra[0]} modules that a stock {type(model).__name__} does not have, so it "
            "cannot be merged; use the adapter with difftune sample / eval instead"
        )
    plain = type(model).from_config(model.config)
    with torch.no_grad():
        state = {key: _merged_value(model, key) for key in plain.state_dict()}
    plain.load_state_dict(state, strict=True)
    return plain.to(next(model.parameters()).device)


def _merged_value(model: nn.Module, key: str) -> torch.Tensor:
    """The tuned value of a plain model's state-dict entry ``key``, read from the tuned ``model``."""
    path, _, attr = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    value = getattr(base, attr).detach()  # a reparametrised weight reads as its value
    if base is not module and attr == "weight":  # a peft layer: its update is added to the weight
        value = value + module.get_delta_weight(ADAPTER_NAME).to(value.dtype)
    return value.clone()
