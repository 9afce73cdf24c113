"""Sharded training (accelerate's FSDP2): what the loop does differently when each process holds a
shard of every parameter instead of the whole model.

Under FSDP2, ``accelerator.prepare`` replaces the backbone's parameters by ``DTensor`` shards, in
place. The loop then rebinds its list of trainable parameters to the new ones
(:func:`live_trainable`), builds the EMA over the shards (so the averages are sharded too), and
writes the parts of a checkpoint that must stay stock (the diffusers model folder, the EMA's
averages) from whole tensors gathered for the moment of writing (:func:`whole_parameters`).
accelerate writes and reads the model and optimizer state itself (``torch.distributed.checkpoint``,
one file per process), loaded in place on resume. docs/multi_gpu.md, "Sharded training".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.fsdp import CPUOffloadPolicy
from torch.distributed.tensor import DTensor, distribute_tensor

from difftune.config.experiment import ExperimentConfig
from difftune.errors import UserError

# accelerate's distributed types that difftune does not train under (FSDP is checked for its version)
UNSUPPORTED = ("DEEPSPEED", "MEGATRON_LM", "XLA_FSDP")
CHOSEN = "difftune_chose_units"  # marks a plugin whose wrapped classes choose_wrap_units set


def distributed_name(accelerator: Any) -> str:
    """accelerate's distributed type without its enum prefix (``"FSDP"``, ``"MULTI_GPU"``, ``"NO"``...)."""
    return str(accelerator.distributed_type).rsplit(".", 1)[-1]


def is_sharded(accelerator: Any) -> bool:
    """Whether ``accelerator`` shards parameters across processes (FSDP)."""
    return distributed_name(accelerator) == "FSDP"


def runs_main_work(accelerator: Any) -> bool:
    """Whether this process runs the model for the work the main process does for the run (sample
    grids, validation, evaluation): the main process does; under sharding every process does, in step
    with it, because a sharded model's forward pass gathers each unit from all of them. Only the main
    process writes or logs what comes of it."""
    return accelerator.is_main_process or is_sharded(accelerator)


@contextlib.contextmanager
def resharded_after(model: torch.nn.Module) -> Iterator[None]:
    """Put every FSDP unit of ``model`` back into shards when the block ends (a no-op without sharding).

    A forward pass without a backward one (samples, evaluation) leaves the root unit gathered, its
    whole parameters registered in place of the shards: the next gather would be skipped and use
    them, stale if the shards have changed since (the EMA's averages swapped in, an optimiser step),
    and :func:`whole_parameters` would find no shards to gather.
    """
    from torch.distributed.fsdp import FSDPModule

    try:
        yield
    finally:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def main_decides(accelerator: Any, decision: bool) -> bool:
    """The main process's ``decision``, on every process when the run is sharded (what they then do
    together, such as gathering the model to write it, must be the same on all); else ``decision``."""
    if not is_sharded(accelerator):
        return decision
    from accelerate.utils import broadcast_object_list

    return bool(broadcast_object_list([decision], from_process=0)[0])


def check_parallelism(accelerator: Any, cfg: ExperimentConfig) -> None:
    """Refuse a launch difftune cannot train under: DeepSpeed, Megatron-LM, FSDP version 1, and, under
    FSDP2, the settings that run the model on the main process alone (a data-driven fit: it would wait
    forever for the others' shards) or that are untested with sharding (compile), or that fail on
    shards (bitsandbytes' 8-bit AdamW).

    Raises:
        UserError: the launch or a setting is not supported with it.
    """
    name = distributed_name(accelerator)
    if name in UNSUPPORTED:
        raise UserError(
            f"accelerate is configured for {name}, which difftune does not train under; use FSDP2 "
            "(`accelerate launch --use_fsdp --fsdp_version 2`, or configs/accelerate/fsdp2.yaml) to shard a "
            "model, or a multi-GPU config without sharding"
        )
    if name != "FSDP":
        return
    if not accelerator.is_fsdp2:
        raise UserError(
            "accelerate is configured for FSDP version 1; difftune shards with FSDP2: set fsdp_version: 2 in "
            "the accelerate config (configs/accelerate/fsdp2.yaml)"
        )
    plugin = accelerator.state.fsdp_plugin
    if not str(plugin.state_dict_type).endswith(".SHARDED_STATE_DICT"):
        raise UserError(
            f"fsdp_state_dict_type is {str(plugin.state_dict_type).rsplit('.', 1)[-1]}; difftune's checkpoints "
            "and exact resume use SHARDED_STATE_DICT: set it in the accelerate config (configs/accelerate/fsdp2.yaml)"
        )
    if plugin.activation_checkpointing:
        raise UserError(
            "fsdp_activation_checkpointing: true is not supported by difftune (it renames the parameters its "
            "checkpoints and EMA are keyed by); set it to false and use train.gradient_checkpointing: true"
        )
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise UserError(
            "fsdp_offload_params: true is not supported by difftune yet (untested with its EMA and resume); set it "
            "to false and fit the model with more processes, bf16 or gradient checkpointing"
        )
    check_sharded_settings(cfg)


def check_sharded_settings(cfg: ExperimentConfig) -> None:
    """Refuse the settings a sharded (FSDP2) run cannot take; also what ``train --dry-run`` checks under an
    FSDP launch. (Samples, validation and evaluation during training run on every process, in step:
    :func:`runs_main_work`.)

    Raises:
        UserError: a setting runs the model on the main process alone, fails on shards or is untested.
    """
    tc = cfg.train
    if cfg.objective.fitted_schedules:
        raise UserError(
            f"objective.{cfg.objective.fitted_schedules[0]}=data_driven is fitted on the main process alone, which a "
            "sharded model cannot do; fit it in a data-parallel run, or choose another schedule"
        )
    if tc.optimizer == "adamw_8bit":
        raise UserError(
            "train.optimizer=adamw_8bit cannot step FSDP's sharded parameters (bitsandbytes has no DTensor "
            "support); use train.optimizer=adamw or adamw_fused: sharding already divides AdamW's states"
        )
    if tc.compile != "no":
        raise UserError(
            f"train.compile={tc.compile} is not supported with FSDP sharding yet; set train.compile=no"
        )


def choose_wrap_units(accelerator: Any, model: torch.nn.Module) -> list[str]:
    """Under FSDP2, make each block of the model's block lists a unit of its own (all-gathered and freed
    one at a time), and each module of the backbone's ``shard_units``, unless the accelerate config names
    the classes (``fsdp_transformer_layer_cls_to_wrap``) or asks for size-based wrapping; returns the
    class names wrapped (empty when not sharded or left to the config)."""
    if not is_sharded(accelerator):
        return []
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    chosen = getattr(plugin, CHOSEN, False)  # by an earlier run in this process (a task sequence)
    policy = plugin.auto_wrap_policy
    if not chosen and (
        policy not in (None, transformer_auto_wrap_policy) or plugin.transformer_cls_names_to_wrap
    ):
        return []
    blocks = {type(block).__name__ for block in _outer_blocks(model)}
    names = sorted(blocks | set(getattr(model, "shard_units", ())))
    plugin.auto_wrap_policy = transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap = names
    setattr(plugin, CHOSEN, True)
    return names


def _outer_blocks(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The blocks of each diffusers model ``model`` holds: the elements of those models' own block lists
    (``nn.ModuleList`` attributes: DiT's and Flux's transformer blocks, a UNet's down and up blocks),
    leaving out torch's own layers (a ControlNet's list of zero convolutions)."""
    from diffusers import ModelMixin

    roots = (
        [model]
        if isinstance(model, ModelMixin)
        else [m for m in model.children() if isinstance(m, ModelMixin)]
    )
    for root in roots:
        for child in root.children():
            if isinstance(child, torch.nn.ModuleList):
                yield from (block for block in child if not type(block).__module__.startswith("torch.nn"))


def largest_unit(model: torch.nn.Module) -> int:
    """Parameters (elements) of the largest unit :func:`choose_wrap_units` makes of ``model``: one of its
    models' blocks, or what lies outside them (what FSDP all-gathers at once)."""
    blocks = [sum(p.numel() for p in block.parameters()) for block in _outer_blocks(model)]
    total = sum(p.numel() for p in model.parameters())
    return max([total - sum(blocks), *blocks])


def trainable_names(model: torch.nn.Module, trainable: list[torch.nn.Parameter]) -> list[str]:
    """The names in ``model`` of ``trainable``, in its order."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for p in trainable]


def live_trainable(model: torch.nn.Module, names: list[str]) -> list[torch.nn.Parameter]:
    """The parameters of ``model`` named ``names``, in that order: the shards FSDP put in place of the
    parameters it was given."""
    params = dict(model.named_parameters())
    return [params[name] for name in names]


@contextlib.contextmanager
def whole_parameters(accelerator: Any, model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the main process's ``model`` holds whole parameters on the CPU in place of its
    shards (every process takes part in gathering them, one tensor at a time, and only the main one
    keeps them); the shards are put back after. Without sharding, the model is left as it is.

    Call it on every process, and do not run the model within it.
    """
    if not is_sharded(accelerator):
        yield
        return
    keep = accelerator.is_main_process
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                whole = param.full_tensor().detach()  # every process takes part; the main one keeps it
                if keep:
                    swapped.append((module, name, param))
                    module._parameters[name] = torch.nn.Parameter(
                        whole.cpu(), requires_grad=param.requires_grad
                    )
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole tensor ``value`` into ``target``, or into this process's shard of it when ``target``
    is sharded (every process must call it, with the same ``value``)."""
    if isinstance(target, DTensor):
        value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
    target.copy_(value)
