"""Everything a training run is made of, assembled before its first step.

:func:`build_run` loads (or takes) the model, applies its tuning method, builds the forward process,
reads the knowledge bank, encodes the target set and sets up the index streams; :func:`run_objective`
fits the data-driven schedules (or reloads a resumed run's fit) and then builds the objective, so
that an objective always exists once training starts; :class:`RunParts` draws each step's batch.
The loop (:mod:`difftune.training.loop`) only steps, logs and checkpoints.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from difftune.backbones.adapters import adapter_directory, apply_tuning, continue_adapter
from difftune.backbones.base import Backbone, enable_gradient_checkpointing
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.loading import LoadedModel, load_pretrained
from difftune.bank.conditions import RunBank
from difftune.bank.run_bank import training_bank
from difftune.bank.teacher_draws import StoredTeacher
from difftune.config.experiment import ExperimentConfig
from difftune.config.train import TrainConfig
from difftune.control.validation import check_validation
from difftune.data.buckets import bucket_weights
from difftune.data.targets import TargetData, prepare_target
from difftune.errors import UserError
from difftune.io.mapped import MappedRows
from difftune.objectives import Draw, Objective, build_objective, teacher_copy
from difftune.process.base import ForwardProcess
from difftune.schedules.data_driven import DataSchedule
from difftune.schedules.ports import resolve_port
from difftune.training.curriculum import step_counts
from difftune.training.evaluation import TrainingEvaluation, split_bank, split_target, training_evaluation
from difftune.training.fitted_schedule import fit_for_run, run_data_schedule
from difftune.training.frozen_precision import cast_frozen, check_frozen_dtype
from difftune.training.outputs import fidelity_validation
from difftune.training.prefetch import RowPrefetcher
from difftune.training.sharding import is_sharded, runs_main_work
from difftune.training.state import LoopState
from difftune.training.streams import BucketStreams, IndexStream, step_bucket, step_generator
from difftune.tuning.size import check_adapter_size


@dataclass
class RunParts:
    """The model, process, data and randomness of a run (everything but the objective).

    Attributes:
        loaded: the model with its frozen parts; ``backbone`` is ``loaded.backbone``.
        trainable: the parameters the tuning method trains (optimised and averaged by the EMA).
        process: the model's forward process.
        target: the encoded target set; ``bank``/``bank_cond`` the knowledge bank (empty without one).
        validation: the ControlNet fidelity check run at validation steps, or ``None``.
        evaluation: the measurements of ``train.eval_every``, or ``None``.
        n_target, n_bank: samples per global batch of each stream at the bank's full share; a step's
            own counts are :meth:`counts` (``objective.bank_curriculum``).
        state: the step and the index streams, saved with every checkpoint.
        prefetch: reads the next step's rows of memory-mapped sets while a step trains.
        bucket_weights: with ``data.buckets``, how often a step draws its rows from each bucket
            (:func:`~difftune.training.streams.step_bucket`); ``None`` without.
        bank_teacher: the bank's stored teacher predictions (``objective.distillation.teacher: stored``):
            each bank row trains at one of its stored draws; ``None`` otherwise.
        frozen_teacher: the frozen copy of the pre-trained model a distillation objective distils from
            (:func:`~difftune.objectives.teacher_copy`), taken before the model is sharded or a checkpoint
            restored; ``None`` when the objective needs none.
    """

    cfg: ExperimentConfig
    loaded: LoadedModel
    trainable: list[torch.nn.Parameter]
    process: ForwardProcess
    bank: torch.Tensor | MappedRows
    bank_cond: Conditioning
    target: TargetData
    validation: Any
    evaluation: TrainingEvaluation | None
    n_target: int
    n_bank: int
    state: LoopState
    prefetch: RowPrefetcher = field(default_factory=RowPrefetcher)
    bucket_weights: torch.Tensor | None = None
    bank_teacher: StoredTeacher | None = None
    frozen_teacher: Backbone | None = None

    @property
    def backbone(self) -> Backbone:
        return self.loaded.backbone

    def counts(self, step: int) -> tuple[int, int]:
        """``(n_target, n_bank)`` of the global batch of ``step`` (``objective.bank_curriculum``)."""
        return step_counts(self.cfg, step)

    def batch(self, step: int, objective: Objective) -> tuple[torch.Tensor, Conditioning, torch.Tensor, Draw]:
        """The global batch of ``step``: x0 (B, C, H, W), conditions (guidance drop applied), is_bank (B,), draw.

        Its first n_target(step) rows are target samples, the other n_bank(step) bank samples (or
        the target samples of the retention stream, with ``objective.retention_data: target``); those
        train the unconditional branch (docs/method.md §2): their condition is dropped
        (``bank.condition: null``: the null label, the empty prompt; a ControlNet keeps the control
        image), or kept (``own``). With stored teacher predictions, each bank row's t and noise are
        those of one of its stored draws (picked with the step's generator), its prediction the draw's
        :attr:`~difftune.objectives.base.Draw.reference`.
        """
        g, ahead = step_generator(self.cfg.train.seed, step), self.prefetch
        n_target, n_bank = self.counts(step)
        bucket = self.bucket(step)
        idx = _take(self.state.target, n_target, bucket)
        parts, conds = [self.target.draw(idx, g, ahead.reader("target"))], [self.target.cond.select(idx)]
        if n_bank:
            retained = _take(self.state.bank, n_bank, bucket)
            if self.cfg.uses_bank:
                parts.append(ahead.read("bank", self.bank, retained))
                retained_cond = self.bank_cond.select(retained)
            else:
                parts.append(self.target.draw(retained, g, ahead.reader("retained")))
                retained_cond = self.target.cond.select(retained)
            if self.cfg.bank.condition == "null":
                retained_cond = self.backbone.drop(retained_cond, torch.ones(n_bank, dtype=torch.bool))
            conds.append(retained_cond)
        x0 = torch.cat(parts)
        cond = Conditioning.cat(conds)
        is_bank = torch.arange(x0.shape[0]) >= n_target
        draw = objective.draw(n_target, n_bank, tuple(x0.shape[1:]), g)
        if n_bank and self.bank_teacher is not None:
            draw = self.bank_teacher.apply(draw, retained, g, ahead.read)
        self._read_ahead(step + 1)
        return x0, self.backbone.drop(cond, draw.drop), is_bank, draw

    def _read_ahead(self, step: int) -> None:
        """Start reading the rows ``step`` will take (memory-mapped sets only)."""
        ahead, target = self.prefetch, self.target
        n_target, n_bank = self.counts(step)
        bucket = self.bucket(step)
        upcoming = {"target": _take(self.state.target, n_target, bucket, ahead=True)}
        if n_bank:
            retained = _take(self.state.bank, n_bank, bucket, ahead=True)
            if self.cfg.uses_bank:
                ahead.ask("bank", self.bank, retained)
                if self.bank_teacher is not None:
                    ahead.ask("bank/teacher_out", self.bank_teacher.out, retained)
            else:
                upcoming["retained"] = retained
        for stream, rows in upcoming.items():
            ahead.ask(f"{stream}/samples", target.samples, rows)
            ahead.ask(f"{stream}/std", target.std, rows)

    def bucket(self, step: int) -> int | None:
        """The bucket ``step`` takes its rows from (``data.buckets``), or ``None`` without buckets."""
        if self.bucket_weights is None:
            return None
        return step_bucket(self.cfg.train.seed, step, self.bucket_weights)

    def summary(
        self, accelerator: Accelerator, resume: Path | None, fit: dict[str, Any] | None
    ) -> dict[str, Any]:
        """What this run trains on and how: printed at the start and saved as ``run_summary.json``."""
        cfg = self.cfg
        n_trainable = sum(p.numel() for p in self.trainable)
        n_total = sum(p.numel() for p in self.backbone.parameters())
        trained = {id(p) for p in self.trainable}
        frozen = sorted({str(p.dtype) for p in self.backbone.parameters() if id(p) not in trained})
        return {
            "model": cfg.model.pretrained,
            "tuning": cfg.tuning.method,
            "trainable_parameters": n_trainable,
            "trainable_share": n_trainable / max(n_total, 1),
            "frozen_dtypes": [name.removeprefix("torch.") for name in frozen],  # train.frozen_dtype
            "target_samples": len(self.target),
            "buckets": bucket_summary(self.target, self.bucket_weights),
            "classes": {name: label for label, name in enumerate(self.target.class_names)},
            "bank_samples": int(self.bank.shape[0]),
            "retention": {"objective": cfg.objective.kind, "data": cfg.objective.retention_data},
            "batch": {"target": self.n_target, "bank": self.n_bank},
            "max_steps": cfg.train.max_steps,
            "default_steps": cfg.default_steps,  # train.max_steps left out of the config
            "resume_from": None if resume is None else {"checkpoint": str(resume), "step": self.state.step},
            "processes": accelerator.num_processes,
            "device": str(accelerator.device),
            "data_schedule": fit,
        }


def _take(
    stream: IndexStream | BucketStreams, n: int, bucket: int | None, ahead: bool = False
) -> torch.Tensor:
    """The next ``n`` indices of ``stream`` (of ``bucket`` with ``data.buckets``); ``ahead``: without moving it."""
    args = (n,) if bucket is None else (n, bucket)
    return stream.peek(*args) if ahead else stream.take(*args)


def bucket_summary(target: TargetData, weights: torch.Tensor | None) -> dict[str, Any] | None:
    """The target's buckets and their rows (each image's, and its mirror's with ``data.hflip``), and the
    ones left out of training (fewer rows than a step takes); ``None`` without buckets."""
    if target.buckets is None or weights is None:
        return None
    rows = [len(part) for part in target.samples.parts]
    return {
        "rows": {b.name: n for b, n in zip(target.buckets, rows, strict=True)},
        "left_out": [b.name for b, w in zip(target.buckets, weights.tolist(), strict=True) if not w],
    }


def load_tuned_model(
    cfg: ExperimentConfig, loaded: LoadedModel | None
) -> tuple[LoadedModel, list[torch.nn.Parameter]]:
    """The model to train (``loaded``, else ``cfg.model``) with its tuning method applied, and its trainable parameters."""
    if loaded is None and adapter_directory(cfg.model.pretrained) is not None:  # train an adapter further
        return continue_adapter(cfg.model.pretrained, cfg.tuning.method, cfg.tuning)
    m = cfg.model
    loaded = loaded or load_pretrained(
        m.pretrained, m.subfolder, m.vae, m.revision, m.controlnet, guidance=m.guidance
    )
    return loaded, apply_tuning(loaded, cfg.tuning.method, cfg.tuning)


def build_run(
    cfg: ExperimentConfig, loaded: LoadedModel | None, accelerator: Accelerator, out: Path
) -> RunParts:
    """Load and prepare everything the run needs; a bad bank or target set is refused before training.

    The bank is read before the target set is encoded, so that a mismatched or damaged bank is
    refused first; the target cache is written by the main process first (``out/target_cache``
    unless ``data.cache_dir``).
    """
    tc = cfg.train
    loaded, trainable = load_tuned_model(cfg, loaded)
    check_adapter_size(cfg.tuning.method, cfg.tuning, loaded.backbone)  # before anything is written
    check_frozen_dtype(tc.frozen_dtype, cfg.tuning.method, loaded.tuning.adapter)
    cast_frozen(loaded.backbone, trainable, tc.frozen_dtype)
    frozen_teacher = teacher_copy(cfg.objective, loaded.backbone)  # the pre-trained model, whole
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(loaded.backbone)
    process, density = loaded.forward_process(cfg.model.pretraining_density)
    cfg = replace(  # the run records its concrete port and pre-training density
        cfg,
        model=replace(cfg.model, pretraining_density=density),
        objective=resolve_port(cfg.objective, process.name),
    )
    check_validation(tc.validation_every, loaded.backbone, cfg.data.annotator)  # before anything is encoded
    spec = tc.evaluation
    bank, held_bank = split_bank(training_bank(cfg, loaded), spec.bank_holdout, spec.seed)
    with accelerator.main_process_first():
        cache_dir = Path(cfg.data.cache_dir or out / "target_cache")
        target = prepare_target(cfg.data, loaded, cache_dir, accelerator.device, mapped=True)
    target, held_target = split_target(target, spec.holdout, spec.seed)
    validation = fidelity_validation(cfg, loaded, target.cond, out)
    evaluation = None
    if tc.eval_every and runs_main_work(accelerator):
        # sharded: every process builds it, the main one first (a feature extractor's weights download once)
        with accelerator.main_process_first() if is_sharded(accelerator) else contextlib.nullcontext():
            evaluation = training_evaluation(
                spec, loaded, tc.sampling, target, held_target, bank, held_bank, cfg.bank.condition
            )
    n_bank = cfg.bank_count  # retention samples per batch, from the bank or the target set
    if target.buckets is not None:
        state, weights = bucket_streams(cfg, target, bank)
    else:
        retention_pool = len(bank) if cfg.uses_bank else len(target)
        state = LoopState(
            target=IndexStream(len(target), tc.seed),
            bank=IndexStream(retention_pool, tc.seed + 1) if n_bank else None,
        )
        weights = None
    return RunParts(
        cfg,
        loaded,
        trainable,
        process,
        bank.samples,
        bank.cond,
        target,
        validation,
        evaluation,
        tc.batch_size - n_bank,
        n_bank,
        state,
        bucket_weights=weights,
        bank_teacher=bank.teacher if cfg.stores_teacher else None,
        frozen_teacher=frozen_teacher,
    )


def bucket_streams(
    cfg: ExperimentConfig, target: TargetData, bank: RunBank
) -> tuple[LoopState, torch.Tensor]:
    """The index streams of a bucketed run (one per bucket, target and retention) and each bucket's weight.

    Raises:
        UserError: the bank was not generated for the target's buckets, or no bucket holds a step's target rows.
    """
    buckets = target.buckets or []
    sizes = [len(part) for part in target.samples.parts]
    need = max(step_counts(cfg, step)[0] for step in range(cfg.train.max_steps))
    weights = bucket_weights(sizes, need, buckets)
    retention = None
    if cfg.uses_bank:
        if bank.buckets != buckets:
            found = ", ".join(b.name for b in bank.buckets or []) or "none"
            raise UserError(
                f"bank {cfg.bank.path} holds samples of the buckets {found}, the target's are "
                f"{', '.join(b.name for b in buckets)}; generate the bank with this data.buckets (`difftune bank`)"
            )
        retention = BucketStreams([len(part) for part in bank.samples.parts], cfg.train.seed + 1)
    elif cfg.bank_count:
        retention = BucketStreams(sizes, cfg.train.seed + 1)
    return LoopState(target=BucketStreams(sizes, cfg.train.seed), bank=retention), weights


def run_objective(
    parts: RunParts, accelerator: Accelerator, model: torch.nn.Module, out: Path, resume: Path | None
) -> tuple[Objective, DataSchedule | None, dict[str, Any] | None]:
    """The run's objective, built once its data-driven schedules are fitted (main process; shared with
    the others) or reloaded from the resumed run; also the fit and its record for ``run_summary.json``.
    """
    cfg = parts.cfg

    def fit() -> DataSchedule:
        return fit_for_run(
            cfg,
            accelerator.unwrap_model(model),
            parts.loaded.scheduler_config,
            parts.target,
            parts.bank,
            parts.bank_cond,
            accelerator.device,
        )

    schedule, record = run_data_schedule(cfg, accelerator, fit, out, resume)
    objective = build_objective(cfg.objective, parts.process, parts.backbone, schedule, parts.frozen_teacher)
    return objective, schedule, record


def make_optimizer(params: list[torch.nn.Parameter], tc: TrainConfig) -> torch.optim.Optimizer:
    """The run's AdamW (``train.optimizer``): torch's, fused (also whenever non-finite steps are
    skipped: it reads the skip flag on the device), or bitsandbytes' 8-bit one.

    Raises:
        UserError: ``adamw_8bit`` without bitsandbytes installed.
    """
    if tc.optimizer == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UserError(
                "train.optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes (or use adamw)"
            ) from None
        return bitsandbytes.optim.AdamW8bit(params, **optimizer_settings(tc))
    fused = tc.optimizer == "adamw_fused" or tc.on_non_finite == "skip"
    return torch.optim.AdamW(params, **optimizer_settings(tc), fused=True if fused else None)


def optimizer_settings(tc: TrainConfig) -> dict[str, Any]:
    """The optimiser settings a resumed run applies over the checkpoint's (this run's, not the saved ones)."""
    return {
        "lr": tc.learning_rate,
        "betas": (tc.adam_beta1, tc.adam_beta2),
        "eps": tc.adam_eps,
        "weight_decay": tc.weight_decay,
    }


def make_ema(params: list[torch.nn.Parameter], decay: float) -> EMAModel | None:
    """The EMA of the trainable parameters (``None`` at decay 0): constant decay from the first step, as DiT."""
    if decay <= 0:
        return None
    return EMAModel(params, decay=decay, min_decay=decay, update_after_step=-1, foreach=True)
