"""The speed switches of ``train``: TF32, channels-last, ``torch.compile`` and the attention kernel;
and how a batch reaches a GPU (pinned memory, no host wait).

None of them changes what is trained or saved: TF32 and the attention kernel change how products
are computed, channels-last only the memory order of convolution weights, and ``torch.compile``
compiles modules in place (``Module.compile``), so parameter names and saved files stay stock.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from diffusers import ModelMixin
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from difftune.config.train import TrainConfig
from difftune.errors import UserError

logger = logging.getLogger(__name__)

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def set_tf32(allow: bool) -> None:
    """Allow (or forbid) TensorFloat-32 in CUDA matrix products and cuDNN convolutions (``train.allow_tf32``).

    Matrix products are set through ``set_float32_matmul_precision``, as the commands set them at start
    (``start_torch``): setting ``torch.backends.cuda.matmul.allow_tf32`` as well would mix PyTorch's two
    precision APIs, after which reading the precision (``torch.compile`` does) raises.
    """
    torch.set_float32_matmul_precision("high" if allow else "highest")
    torch.backends.cudnn.allow_tf32 = allow


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks ``compile: regional`` compiles one by one.

    A diffusers model that names its repeated block classes (``_repeated_blocks``) gives every module
    of those classes; otherwise the members of the model's own ``nn.ModuleList`` children (DiT's
    ``transformer_blocks``, a UNet's ``down_blocks`` and ``up_blocks``) and its ``mid_block``.
    """
    names = set(getattr(model, "_repeated_blocks", None) or ())
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    blocks = [m for child in model.children() if isinstance(child, nn.ModuleList) for m in child]
    mid = getattr(model, "mid_block", None)
    return blocks + ([mid] if isinstance(mid, nn.Module) else [])


def compile_model(model: nn.Module, mode: str) -> int:
    """``torch.compile`` ``model`` in place (``full``) or each of its :func:`repeated_blocks` (``regional``).

    Blocks are compiled for static shapes: a UNet's blocks of one class run at several sizes, and
    compiling the second size with dynamic shapes made inductor fail (torch 2.13). Whether the compiled
    code's gradients are right is checked on the first batch (:mod:`difftune.training.compile_check`).

    Returns:
        how many modules were compiled (0 for ``no``).

    Raises:
        UserError: ``regional`` on a model without repeated blocks.
    """
    if mode == "no":
        return 0
    if mode == "full":
        model.compile()
        return 1
    blocks = repeated_blocks(model)
    if not blocks:
        raise UserError(
            f"train.compile=regional: {type(model).__name__} has no repeated blocks to compile; "
            "use train.compile=full"
        )
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


def apply_speed_settings(backbone: nn.Module, tc: TrainConfig) -> None:
    """Apply ``train.allow_tf32``, ``channels_last`` and ``compile`` to the backbone about to be trained.

    ``compile`` compiles each diffusers model the backbone runs (a ControlNet run: the ControlNet and
    the frozen UNet), not the backbone's own conditioning code.
    """
    set_tf32(tc.allow_tf32)
    if tc.channels_last:
        backbone.to(memory_format=torch.channels_last)
    for model in backbone.children():
        if isinstance(model, ModelMixin):
            compiled = compile_model(model, tc.compile)
            if compiled:
                logger.info(
                    "torch.compile (%s): %d module(s) of %s", tc.compile, compiled, type(model).__name__
                )


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; on a GPU through pinned memory, without blocking the host."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def autocast_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype attention runs in under ``train.mixed_precision``."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


@contextlib.contextmanager
def attention_kernel(
    backend: str, device: torch.device, dtype: torch.dtype = torch.float32
) -> Iterator[None]:
    """Restrict scaled-dot-product attention to ``backend`` (``train.sdpa_backend``) inside the block.

    Raises:
        UserError: the kernel cannot run on ``device`` for ``dtype`` (the dtype attention runs in: the
            mixed-precision one, if any), checked on a small attention before training.
    """
    if backend == "auto":
        yield
        return
    with sdpa_kernel([SDPA_BACKENDS[backend]]):
        q = torch.zeros(1, 1, 8, 64, device=device, dtype=dtype)
        try:
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"train.sdpa_backend={backend} cannot run on {device} ({first}); use train.sdpa_backend=auto"
            ) from None
        yield
