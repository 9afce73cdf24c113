"""The model's part of a checkpoint's ``state/`` folder: only what trains, loaded into the live model.

accelerate's ``save_state`` writes the whole prepared model and its ``load_state`` reads the whole file
into memory beside the model before copying it in. For a run that trains part of its model (LoRA and
the other parameter-efficient methods) the first stores the frozen base in every checkpoint (3.3 GB
for Stable Diffusion's UNet, against megabytes of adapter); the second needs the model's size again
at resume. :func:`compact_model_state` hooks both: a checkpoint holds the trainable tensors (all of
them under full fine-tuning), and resuming copies them one at a time into the parameters the run
already holds. A checkpoint written before, with the whole model, loads the same way.

Under FSDP, accelerate writes and reads each process's shards itself (in place); around those calls
:func:`sharded_trainable_only` narrows the model's state dict to what trains, so that a sharded
adapter run's checkpoint does not hold the frozen base either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from difftune.errors import UserError
from difftune.training.sharding import is_sharded


def _file(input_dir: str, index: int) -> Path:
    """accelerate's name for the ``index``-th model's weights."""
    return Path(input_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")


def load_in_place(module: torch.nn.Module, path: Path) -> int:
    """Copy every tensor of the safetensors file ``path`` into ``module``'s tensor of that name, one at a
    time (the extra memory is one tensor); return how many were copied.

    Raises:
        UserError: the file is missing, names a tensor the module does not have, has another shape, or
            leaves a trainable parameter without a value.
    """
    if not path.is_file():
        raise UserError(f"{path} is missing; resume from another checkpoint")
    targets = module.state_dict(keep_vars=True)
    filled: set[int] = set()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        unknown = [key for key in keys if key not in targets]
        if unknown:
            raise UserError(
                f"{path} holds {len(unknown)} tensors this model does not have (first: {unknown[0]}); it "
                "was written by another model or tuning method: resume with the run's own settings"
            )
        with torch.no_grad():
            for key in keys:
                value, target = f.get_tensor(key), targets[key]
                if value.shape != target.shape:
                    raise UserError(
                        f"{path}: {key} has shape {tuple(value.shape)}, the model {tuple(target.shape)}; resume "
                        "with the run's own model"
                    )
                target.copy_(value)
                filled.add(id(target))
    missing = [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in filled]
    if missing:
        raise UserError(
            f"{path} holds no value for {len(missing)} trainable parameters (first: {missing[0]}); the "
            "checkpoint is incomplete: resume from another one"
        )
    return len(keys)


@contextlib.contextmanager
def compact_model_state(accelerator: Any, model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``accelerator.save_state`` writes only ``model``'s trainable tensors when it
    trains part of itself, and ``load_state`` loads the model's tensors in place (:func:`load_in_place`).

    ``model`` is the unwrapped module given to ``accelerator.prepare``; its trainable flags are read
    when the block starts. Under FSDP nothing is hooked: accelerate writes each process's shards and
    reads them back in place itself (:func:`sharded_trainable_only` keeps those shards to what trains)."""
    if is_sharded(accelerator):
        yield
        return
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    partial = len(trainable) < len(list(model.parameters()))

    def save(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
        if partial:
            for i, state in enumerate(weights):
                weights[i] = {key: value for key, value in state.items() if key in trainable}

    def load(models: list[Any], input_dir: str) -> None:
        for index in range(len(models) - 1, -1, -1):  # taken out of the list: accelerate loads none of them
            load_in_place(accelerator.unwrap_model(models.pop(index)), _file(input_dir, index))

    handles = [accelerator.register_save_state_pre_hook(save), accelerator.register_load_state_pre_hook(load)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def sharded_trainable_only(accelerator: Any, model: torch.nn.Module) -> Iterator[None]:
    """Within the block, under FSDP, ``model.state_dict()`` holds only its trainable parameters, and
    ``model.load_state_dict`` does not miss the rest: wrap accelerate's ``save_state`` and
    ``load_state`` in it, so that a sharded checkpoint of a run that trains part of its model (LoRA and
    the other parameter-efficient methods) holds the trained shards only, and loads them in place; the
    frozen weights keep the values the run loaded. A no-op without sharding (:func:`compact_model_state`
    does it there) and under full fine-tuning. A checkpoint that holds the whole model loads too.
    """
    if not is_sharded(accelerator):
        yield
        return
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if len(trainable) == len(list(model.parameters())):
        yield
        return

    def drop_frozen(module: torch.nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
        for key in [key for key in state if key.startswith(prefix) and key[len(prefix) :] not in trainable]:
            del state[key]

    def forgive_frozen(module: torch.nn.Module, incompatible: Any) -> None:
        incompatible.missing_keys[:] = [key for key in incompatible.missing_keys if key in trainable]

    handles = [
        model.register_state_dict_post_hook(drop_frozen),
        model.register_load_state_dict_post_hook(forgive_frozen),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
