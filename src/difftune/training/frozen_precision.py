"""The frozen base of a parameter-efficient run, stored in 16 bits (``train.frozen_dtype``).

A LoRA (or any adapter) run trains a few million parameters over a base of billions that never
changes. Kept in float32, the base alone is 4 bytes a parameter (Flux.1-dev: 44 GiB); in bfloat16 it
is half that, which is what diffusers' LoRA scripts do under mixed precision. The trained parameters
stay float32 (the optimiser's master weights), and autocast runs the forward pass in the 16-bit type
anyway, so the training step computes the same thing up to the rounding of the frozen weights.

Only an adapter's base is cast: a full fine-tuning run has no frozen base, and a ControlNet's frozen
UNet is written into its saved pipeline, where rounding it would change the model users load.
"""

from __future__ import annotations

import torch

from difftune.errors import UserError

FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_frozen_dtype(frozen_dtype: str, method: str, adapter: bool) -> None:
    """Refuse a 16-bit frozen base for a method that has none (``train.mixed_precision`` is checked
    with the config: :class:`~difftune.config.train.TrainConfig`).

    Raises:
        UserError: ``frozen_dtype`` is 16-bit and the tuning method is not parameter-efficient.
    """
    if frozen_dtype != "float32" and not adapter:
        raise UserError(
            f"train.frozen_dtype={frozen_dtype} stores the frozen base of a parameter-efficient method, and "
            f"tuning.method={method} has none: set train.frozen_dtype=float32 (or tuning.method=lora)"
        )


def frozen_bytes(param: torch.Tensor, frozen_dtype: str) -> int:
    """Bytes per element of the frozen parameter ``param`` once :func:`cast_frozen` has cast it."""
    dtype = FROZEN_DTYPES[frozen_dtype]
    cast = param.is_floating_point() and dtype != torch.float32
    return dtype.itemsize if cast else param.element_size()


def cast_frozen(module: torch.nn.Module, trainable: list[torch.nn.Parameter], frozen_dtype: str) -> int:
    """Cast every floating-point parameter of ``module`` that is not in ``trainable`` to ``frozen_dtype``
    (in place; meta tensors too); returns the number of parameters cast. Buffers stay as they are (a
    few positional tables, read in float32)."""
    dtype = FROZEN_DTYPES[frozen_dtype]
    if dtype == torch.float32:
        return 0
    trained = {id(p) for p in trainable}
    cast = 0
    for param in module.parameters():
        if id(param) not in trained and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += param.numel()
    return cast
