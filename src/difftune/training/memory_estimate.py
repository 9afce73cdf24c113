"""How much device memory a training run needs per process, estimated before anything is loaded.

``difftune train --dry-run`` prints it, so a user knows before a launch whether a run fits. The model
is built from its config on the ``meta`` device (no weights read), the run's tuning method is applied
to it, and one micro-batch's forward pass is traced there: every tensor autograd saves for the
backward pass is counted (``saved_tensors_hooks``), with gradient checkpointing when the run uses it.
The estimate is the peak of these:

* the trained parameters in float32 (accelerate keeps float32 master weights under mixed precision),
  their gradients, AdamW's two moments (float32, or one byte each for ``adamw_8bit``) and the EMA;
* the frozen parameters of the backbone (a LoRA's base, a ControlNet's UNet) in float32, or in
  ``train.frozen_dtype`` (an adapter's base);
* the frozen parts loaded beside it (VAE, text encoders) at the size of their safetensors files;
* distillation's teacher under full fine-tuning: a frozen copy of the backbone in
  ``objective.distillation.teacher_dtype`` (none with ``teacher: stored``, whose predictions are in the
  bank, nor for a method whose adapters are switched off);
* the saved activations of one micro-batch, halved under bf16/fp16 autocast (an approximation:
  normalisations and softmax keep float32 inputs), with attention saving what a fused kernel saves
  (not the attention matrix) unless ``train.sdpa_backend: math``;
* under data parallelism (more than one process), DDP's gradient buckets: one more gradient copy;
* under mixed precision, autocast's 16-bit copies of the trained weights (cached for the step).

Under FSDP2 sharding (``accelerate launch`` with an FSDP config), the backbone's weights, gradients,
optimizer states and EMA are divided among the processes, and what FSDP gathers whole at once takes
the place of DDP's buckets and autocast's copies: two of the largest units' weights in the compute
dtype (the one running and the next, prefetched) and one unit's float32 gradients before they are
reduce-scattered. The VAE, text encoders and a distillation teacher stay whole on every process.

Everything is held at once except the gradients and the activations: the backward pass makes the
former as it frees the latter, so the peak holds the larger of the two (both under gradient
accumulation, whose gradients live through the next micro-batch's forward pass).
``benchmarks/real_size.py`` sets the estimate beside a real-size run's measured peak.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from difftune.backbones.base import Backbone, enable_gradient_checkpointing
from difftune.backbones.conditioning import Conditioning
from difftune.config.experiment import ExperimentConfig
from difftune.errors import UserError
from difftune.objectives import needs_teacher_copy
from difftune.training.frozen_precision import check_frozen_dtype, frozen_bytes
from difftune.training.sharding import largest_unit
from difftune.tuning import build_tuning

GIB = 2**30
MIB = 2**20
FLOAT32 = 4
PROMPT_TOKENS = 77  # CLIP's sequence length, for a text model's prompt embeddings on the meta device
OPTIMIZER_BYTES = {"adamw": 2 * FLOAT32, "adamw_fused": 2 * FLOAT32, "adamw_8bit": 2}
COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process, by what holds them (see the module's docstring)."""

    trained: int
    gradients: int
    optimizer: int
    ema: int
    frozen: int
    components: int
    activations: int | None  # None: the forward pass could not be traced on the meta device
    buckets: int
    micro_batch: int
    casts: int = 0  # mixed precision: autocast's 16-bit copies of the trained weights, cached in a step
    size: str = ""  # data.buckets: the bucket whose activations are traced (the largest)
    accumulates: bool = False  # gradient accumulation: gradients live through the next forward pass
    teacher: int = 0  # distillation under full fine-tuning: the frozen copy of the model (teacher: copy)
    gathered: int = 0  # FSDP: the units' whole weights and gradients gathered at once
    sharded_over: int = 0  # FSDP: the processes the backbone's state is divided among (0: not sharded)

    @property
    def total(self) -> int:
        """The peak: the backward pass makes the gradients as it frees the activations, so the peak holds
        the larger of the two, not both (both with gradient accumulation, whose gradients are kept
        through the next micro-batch's forward pass)."""
        held = (
            self.trained
            + self.optimizer
            + self.ema
            + self.frozen
            + self.components
            + self.buckets
            + self.casts
            + self.teacher
            + self.gathered
        )
        activations = self.activations or 0
        if self.accumulates:
            return held + self.gradients + activations
        return held + max(self.gradients, activations)

    def line(self) -> str:
        """The dry run's line: the total and its parts."""
        parts = [
            f"trained weights {_size(self.trained)}",
            f"gradients {_size(self.gradients)}",
            f"optimizer {_size(self.optimizer)}",
        ]
        if self.ema:
            parts.append(f"EMA {_size(self.ema)}")
        parts.append(f"frozen weights {_size(self.frozen + self.components)}")
        if self.teacher:
            parts.append(f"teacher copy {_size(self.teacher)}")
        if self.buckets:
            parts.append(f"DDP buckets {_size(self.buckets)}")
        if self.casts:
            parts.append(f"16-bit weight copies {_size(self.casts)}")
        if self.sharded_over:
            parts.append(f"gathered FSDP units {_size(self.gathered)}")
        if self.activations is None:
            parts.append("activations not estimated")
        else:
            at = f", largest bucket {self.size}" if self.size else ""
            parts.append(f"activations {_size(self.activations)} (micro-batch {self.micro_batch}{at})")
        sharded = f" (weights and states sharded over {self.sharded_over})" if self.sharded_over else ""
        return f"memory     about {_size(self.total)} per process{sharded}: " + ", ".join(parts)


def _teacher_bytes(cfg: ExperimentConfig, backbone: Backbone) -> int:
    """The frozen copy distillation keeps of a fully fine-tuned model (``teacher: copy``); 0 otherwise."""
    if not needs_teacher_copy(cfg.objective, backbone):
        return 0
    per = 2 if cfg.objective.distillation.teacher_dtype == "bfloat16" else FLOAT32
    return sum(p.numel() for p in backbone.parameters()) * per


def _size(n: int) -> str:
    """``n`` bytes in GiB, or MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def estimate_training_memory(
    cfg: ExperimentConfig,
    backbone: Backbone,
    model_root: Path | None = None,
    processes: int = 1,
    bucket: tuple[str, tuple[int, int, int]] | None = None,
    sharded: bool = False,
) -> MemoryEstimate:
    """The run's memory per process, from ``backbone`` built on the ``meta`` device (it is modified:
    the tuning method is applied to it).

    Args:
        model_root: the local pipeline folder, whose VAE and text encoders are counted; ``None``: not
            counted (a hub model: the dry run reads no weights' listing).
        processes: data-parallel processes (each holds all of the above, unless ``sharded``).
        bucket: with ``data.buckets``, the name and sample shape (C, H, W) of the largest bucket, whose
            activations are traced instead of the model's own size's.
        sharded: FSDP2 divides the backbone's weights and states among the ``processes``.
    """
    tc = cfg.train
    tuning = build_tuning(cfg.tuning.method, cfg.tuning)
    trainable = tuning.prepare(backbone)
    check_frozen_dtype(tc.frozen_dtype, cfg.tuning.method, tuning.adapter)
    trained = sum(p.numel() for p in trainable)
    trained_ids = {id(p) for p in trainable}
    frozen = sum(
        p.numel() * frozen_bytes(p, tc.frozen_dtype)
        for p in backbone.parameters()
        if id(p) not in trained_ids
    )
    micro_batch = max(1, tc.batch_size // (processes * tc.gradient_accumulation))
    fused = tc.sdpa_backend != "math"
    shape = bucket[1] if bucket else backbone.sample_shape
    activations = _saved_activation_bytes(backbone, micro_batch, tc.gradient_checkpointing, fused, shape)
    if activations is not None and tc.mixed_precision != "no":
        activations //= 2
    mixed = tc.mixed_precision != "no"
    estimate = MemoryEstimate(
        trained=trained * FLOAT32,
        gradients=trained * FLOAT32,
        optimizer=trained * OPTIMIZER_BYTES[tc.optimizer],
        ema=trained * FLOAT32 if tc.ema_decay > 0 else 0,
        frozen=frozen,
        components=_component_bytes(model_root, cfg.model.vae),
        activations=activations,
        buckets=trained * FLOAT32 if processes > 1 else 0,
        micro_batch=micro_batch,
        accumulates=tc.gradient_accumulation > 1,
        casts=trained * 2 if mixed else 0,
        teacher=_teacher_bytes(cfg, backbone),
        size=bucket[0] if bucket else "",
    )
    if not sharded:
        return estimate
    unit = largest_unit(backbone)
    return replace(
        estimate,
        trained=-(-estimate.trained // processes),
        gradients=-(-estimate.gradients // processes),
        optimizer=-(-estimate.optimizer // processes),
        ema=-(-estimate.ema // processes),
        frozen=-(-estimate.frozen // processes),
        buckets=0,
        casts=0,
        gathered=2 * unit * (2 if mixed else FLOAT32) + unit * FLOAT32,
        sharded_over=processes,
    )


def _meta_condition(backbone: Backbone, n: int) -> Conditioning:
    """An unconditional condition for ``n`` samples on the meta device (a text model built from its
    config has no prompt embedding yet: it gets a meta one of CLIP's length)."""
    if getattr(backbone, "null_prompt", None) is not None and backbone.null_prompt.numel() == 0:
        width = backbone.inner.config.cross_attention_dim
        width = width if isinstance(width, int) else width[0]
        backbone.null_prompt = torch.zeros(1, PROMPT_TOKENS, int(width), device="meta")
    return backbone.unconditional(n, device="meta")


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash, memory-efficient, cuDNN) saves for its backward pass: the
    queries, keys, values, the output and the log-sum-exp per query. On the meta device PyTorch takes
    the math kernel, which also saves the attention matrix; a real run does not, unless
    ``train.sdpa_backend: math``."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """Trace attention without a mask as a fused kernel would run it (:class:`_FusedAttention`)."""
    math = F.scaled_dot_product_attention

    def attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        if attn_mask is not None or query.device.type != "meta":
            return math(query, key, value, attn_mask=attn_mask, **kwargs)
        return _FusedAttention.apply(query, key, value)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = math


class SavedActivations:
    """Counts the bytes autograd saves for the backward pass inside ``with counter.hooks():``.

    A tensor saved twice counts once, and the module's parameters (and views of them: a linear layer
    saves its transposed weight) do not count: they are held as weights already.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.parameters = {id(p) for p in module.parameters()}
        # each saved tensor is kept (meta: no memory) so that its id is not reused by a later tensor
        self.saved: dict[int, tuple[torch.Tensor, int]] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        root = tensor if tensor._base is None else tensor._base
        if id(root) not in self.parameters:
            self.saved[id(tensor)] = (tensor, tensor.numel() * tensor.element_size())
        return tensor

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    @property
    def total(self) -> int:
        return sum(size for _, size in self.saved.values())


def _saved_activation_bytes(
    backbone: Backbone, n: int, checkpointing: bool, fused: bool, shape: tuple[int, ...]
) -> int | None:
    """Bytes autograd saves for the backward pass of one forward over ``n`` samples of ``shape`` (meta
    device); attention as a fused kernel runs it (``fused``) or as the math kernel does."""
    if checkpointing:
        enable_gradient_checkpointing(backbone)
    counter = SavedActivations(backbone)
    try:
        with torch.device("meta"):
            cond = _meta_condition(backbone, n)
            x_t = torch.zeros(n, *shape)
            t = torch.zeros(n, dtype=torch.long)
        backbone.train()
        kernel = _fused_attention() if fused else contextlib.nullcontext()
        with kernel, counter.hooks():
            backbone(x_t, t, cond)
    except (RuntimeError, NotImplementedError, UserError, TypeError, ValueError):
        return None  # an operation without a meta kernel: the estimate says so
    return counter.total


def _component_bytes(model_root: Path | None, vae: str | None) -> int:
    """Size of the frozen parts loaded beside the backbone (VAE, text encoders): their weight files."""
    folders = [] if model_root is None else [model_root / name for name in COMPONENTS]
    if vae is not None and Path(vae).is_dir():
        folders = [f for f in folders if f.name != "vae"]
        folders.append(Path(vae) / "vae" if (Path(vae) / "vae").is_dir() else Path(vae))
    return sum(
        f.stat().st_size for folder in folders if folder.is_dir() for f in folder.glob("*.safetensors")
    )
