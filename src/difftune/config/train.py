"""The ``train`` section of the experiment config: the optimisation loop, its outputs and its safety settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from difftune.config.checks import _check, _check_fields
from difftune.config.evaluation import BestMetric, EvaluationSpec
from difftune.config.sampling import SamplingSpec

NonFinitePolicy = Literal["stop", "skip"]
NON_FINITE_POLICIES: tuple[str, ...] = get_args(NonFinitePolicy)
# diffusers.optimization.get_scheduler's schedules (all but piecewise_constant, which needs step rules)
LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
OptimizerName = Literal["adamw", "adamw_fused", "adamw_8bit"]
CompileMode = Literal["no", "full", "regional"]
SdpaBackend = Literal["auto", "flash", "efficient", "cudnn", "math"]
# the autocast type (train.mixed_precision) a 16-bit frozen base (train.frozen_dtype) runs under
FROZEN_AUTOCAST = {"bfloat16": "bf16", "float16": "fp16"}
Tracker = Literal[
    "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "none"
]


def default_steps_note(steps: int) -> str:
    """The start-up note of a run whose config leaves out ``train.max_steps`` (``steps``: its default)."""
    return (
        f"train.max_steps is not set: the default of {steps:,} steps applies (set train.max_steps to choose)"
    )


@dataclass
class TrainConfig:
    """The optimisation loop (defaults follow the paper's DiT recipe, docs/method.md §2).

    Attributes:
        output_dir: run directory (checkpoints, logs, samples).
        batch_size: global batch per optimiser step (target + bank), across processes and
            accumulation steps.
        gradient_accumulation: micro-steps per optimiser step.
        max_steps: optimiser steps.
        learning_rate, weight_decay, adam_beta1, adam_beta2, adam_eps, max_grad_norm: AdamW.
        lr_scheduler: how the learning rate moves over the steps, one of diffusers'
            ``get_scheduler`` schedules (``constant``, ``constant_with_warmup``, ``linear``,
            ``cosine``, ``cosine_with_restarts``, ``polynomial``); ``constant`` (the paper's) ignores
            ``lr_warmup_steps``.
        lr_warmup_steps: optimiser steps of linear warm-up from 0 to ``learning_rate``.
        lr_num_cycles: restarts of ``cosine_with_restarts``; lr_power: the exponent of ``polynomial``.
            The rate is a function of the step alone, so a resumed run continues the same curve.
        optimizer: ``adamw`` (torch's, multi-tensor), ``adamw_fused`` (one fused kernel per step; the
            one ``on_non_finite: skip`` uses in any case) or ``adamw_8bit`` (bitsandbytes' 8-bit
            states: a quarter of AdamW's state memory; needs ``pip install bitsandbytes``).
        allow_tf32: TensorFloat-32 matrix products and convolutions on Ampere or newer GPUs (the
            authors' setting); no effect on a CPU.
        compile: ``torch.compile`` the trained model in place: ``full`` (the whole model) or
            ``regional`` (each repeated block, a much shorter compile); ``no``. Saved weights and
            names are unchanged.
        channels_last: keep the model's convolution weights in channels-last memory order (faster
            convolutions for UNets on GPUs).
        sdpa_backend: the kernel of PyTorch's scaled-dot-product attention in training: ``auto``
            (PyTorch chooses), ``flash``, ``efficient``, ``cudnn`` or ``math``; a kernel the device
            lacks is refused at start-up.
        report_to: the accelerate tracker the scalars go to (``tensorboard``, ``wandb``, ``mlflow``,
            ...; ``none``: only ``metrics.jsonl``); one that is not installed is refused.
        ema_decay: constant EMA decay (0 disables EMA).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (accelerate).
        frozen_dtype: the dtype of a parameter-efficient run's frozen base: ``"float32"`` (default),
            or ``"bfloat16"`` / ``"float16"`` (half the base's memory; needs the matching
            ``mixed_precision``, and an adapter method: :mod:`difftune.training.frozen_precision`).
        gradient_checkpointing: recompute the trained model's activations in the backward pass
            instead of keeping them (diffusers' ``enable_gradient_checkpointing``): less memory, about
            a third more compute; the same gradients.
        seed: seed of everything random in training (data order, t, noise, label dropout).
        checkpoint_every: steps between checkpoints (0 = only at the end).
        keep_checkpoints: most recent checkpoints kept (older ones are deleted).
        log_every: steps between scalar logs.
        sample_every: steps between sample grids (0 = never).
        sampling: how the grids (and the validation images) are sampled (``scheduler``, ``steps``,
            ``guidance_scale``, ``seed``: :class:`SamplingSpec`; image i of a grid uses seed
            ``sampling.seed + i``).
        validation_every: a ControlNet run with an annotator (``data.annotator``) measures condition
            fidelity at step 0 and every this many steps (0 = never), into ``fidelity.jsonl``.
        validation_samples: how many fixed (prompt, control) pairs of the target set it generates.
        validation_prompts: ``"own"``: each pair's caption; ``"empty"``: the empty prompt, so that
            only the control image says what to draw (for data whose captions already fix the image's
            layout, e.g. digits).
        validation_edge_tolerance: pixels an edge may be off and still count in edge F1 (1 suits
            512-pixel images; 0 for tiny ones, where one pixel is a large share of the image).
        eval_every: steps between evaluations (0 = never): at step 0, every this many steps and at the
            last step, the model (its EMA weights when ``ema_decay`` > 0) is scored as
            ``evaluation`` says, into TensorBoard and ``metrics.jsonl`` (``eval/...`` keys).
        keep_best: ``fid``, ``kid``, ``loss`` (held-out target loss) or ``forgetting``: keep the
            model that scored lowest at an evaluation in ``best/`` beside ``final/``, with its step and
            score in ``best/best.json``; ``None``: no ``best/``.
        evaluation: what an evaluation measures (:class:`~difftune.config.evaluation.EvaluationSpec`).
        resume: ``"latest"``, a checkpoint directory, or ``None``.
        overwrite: let a fresh run replace an earlier run's checkpoints, ``final/`` and logs in
            ``output_dir`` (or a resumed run delete the checkpoints newer than its own); without it
            such a run is refused.
        accept_config_changes: resume although the checkpoint was written with another data,
            model, objective, batch or seed setting (the differences are listed either way).
        on_non_finite: what a step whose loss (or gradient) is NaN or infinite does. ``"stop"``
            (default): the run stops at the next log or checkpoint, and no weights from that step
            on are saved. ``"skip"``: the step leaves the weights and the optimiser untouched
            (decided on the device, no host synchronisation) and the run goes on; it stops once
            more than ``max_non_finite_steps`` steps were skipped.
        max_non_finite_steps: skipped steps tolerated by ``on_non_finite: skip``.
    """

    output_dir: str = "runs/difftune"
    batch_size: int = 32
    gradient_accumulation: int = 1
    max_steps: int = 24000
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 0.0
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    optimizer: OptimizerName = "adamw"
    allow_tf32: bool = True
    compile: CompileMode = "no"
    channels_last: bool = False
    sdpa_backend: SdpaBackend = "auto"
    report_to: Tracker = "tensorboard"
    ema_decay: float = 0.9999
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 2000
    keep_checkpoints: int = 3
    log_every: int = 50
    sample_every: int = 0
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    validation_every: int = 0
    validation_samples: int = 8
    validation_prompts: Literal["own", "empty"] = "own"
    validation_edge_tolerance: int = 1
    eval_every: int = 0
    keep_best: BestMetric | None = None
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    resume: str | None = None
    overwrite: bool = False
    accept_config_changes: bool = False
    on_non_finite: NonFinitePolicy = "stop"
    max_non_finite_steps: int = 10

    def __post_init__(self) -> None:
        if self.mixed_precision is False:  # YAML 1.1 reads an unquoted `no` as false
            self.mixed_precision = "no"
        _check_fields(self, "train")
        _check_fields(self.sampling, "train.sampling")
        _check_fields(self.evaluation, "train.evaluation")
        _check(
            self.frozen_dtype == "float32" or self.mixed_precision == FROZEN_AUTOCAST[self.frozen_dtype],
            f"train.frozen_dtype={self.frozen_dtype} runs under train.mixed_precision="
            f"{FROZEN_AUTOCAST.get(self.frozen_dtype)}, not {self.mixed_precision} (float32 activations would meet "
            f"16-bit weights): set train.mixed_precision={FROZEN_AUTOCAST.get(self.frozen_dtype)} or "
            "train.frozen_dtype=float32",
        )
        _check(self.batch_size > 0, f"train.batch_size={self.batch_size} must be > 0")
        _check(self.gradient_accumulation > 0, "train.gradient_accumulation must be > 0")
        _check(self.max_steps > 0, f"train.max_steps={self.max_steps} must be > 0")
        _check(self.learning_rate > 0, f"train.learning_rate={self.learning_rate} must be > 0")
        _check(
            0 <= self.lr_warmup_steps < self.max_steps,
            f"train.lr_warmup_steps={self.lr_warmup_steps} must be >= 0 and below train.max_steps={self.max_steps}",
        )
        _check(
            self.lr_warmup_steps == 0 or self.lr_scheduler != "constant",
            f"train.lr_warmup_steps={self.lr_warmup_steps} has no effect with train.lr_scheduler=constant; "
            "use constant_with_warmup (or linear, cosine, ...)",
        )
        _check(self.lr_num_cycles >= 1, f"train.lr_num_cycles={self.lr_num_cycles} must be >= 1")
        _check(self.lr_power > 0, f"train.lr_power={self.lr_power} must be > 0")
        _check(
            not (self.optimizer == "adamw_8bit" and self.on_non_finite == "skip"),
            "train.on_non_finite=skip needs an optimiser that reads the skip flag on the device "
            "(adamw or adamw_fused); bitsandbytes' adamw_8bit does not: use on_non_finite=stop",
        )
        _check(0.0 <= self.ema_decay < 1.0, f"train.ema_decay={self.ema_decay} must be in [0, 1)")
        _check(
            self.max_non_finite_steps >= 0,
            f"train.max_non_finite_steps={self.max_non_finite_steps} must be >= 0",
        )
        _check(self.keep_checkpoints > 0, "train.keep_checkpoints must be > 0")
        _check(self.log_every > 0, "train.log_every must be > 0")
        _check(self.sample_every >= 0, f"train.sample_every={self.sample_every} must be >= 0 (0 = no grids)")
        _check(self.validation_every >= 0, f"train.validation_every={self.validation_every} must be >= 0")
        _check(self.eval_every >= 0, f"train.eval_every={self.eval_every} must be >= 0 (0 = no evaluation)")
        _check(
            self.keep_best is None or self.eval_every > 0,
            f"train.keep_best={self.keep_best} picks among evaluations: set train.eval_every (e.g. 500)",
        )
        held = self.evaluation.holdout or self.evaluation.bank_holdout
        _check(
            not held or self.eval_every > 0,
            "train.evaluation.holdout and bank_holdout keep samples out of training for evaluations, but "
            "train.eval_every=0: set train.eval_every (e.g. 500), or the hold-outs to 0",
        )
        self.evaluation.check_best(self.keep_best)
        _check(
            self.validation_samples >= 1, f"train.validation_samples={self.validation_samples} must be >= 1"
        )
