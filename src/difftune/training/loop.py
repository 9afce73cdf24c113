"""The accelerate training loop: one forward pass over target + bank samples per micro-batch.

The loop knows nothing of a specific model, space, tuning method or weighting: the backbone adapter
(and its conditioning), the codec's prepared target data, the tuning method's trainable parameters
and the objective (:mod:`difftune.objectives`) are given to it (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import SafetensorError
from tqdm.auto import tqdm

from difftune.backbones.loading import LoadedModel
from difftune.backbones.saving import ema_weights
from difftune.config.experiment import ExperimentConfig
from difftune.errors import UserError
from difftune.objectives import Objective
from difftune.objectives.term_log import TermLog
from difftune.schedules.data_driven import DataSchedule
from difftune.training.build import build_run, make_ema, make_optimizer, optimizer_settings, run_objective
from difftune.training.checkpoint_files import write_checkpoint_files
from difftune.training.compile_check import check_compiled_gradients
from difftune.training.curriculum import bank_weight_at
from difftune.training.divergence import NonFiniteGuard
from difftune.training.evaluation import BestModel
from difftune.training.lr_schedule import LearningRateSchedule
from difftune.training.model_state import compact_model_state, sharded_trainable_only
from difftune.training.outputs import (
    append_history,
    flat_config,
    save_sample_grid,
    tracker,
    write_best,
    write_final,
)
from difftune.training.run_dir import (
    BEST_DIR,
    RunLock,
    check_resume_config,
    claim_run_folder,
    rewind_logs,
    rotate_checkpoints,
    write_run_summary,
)
from difftune.training.sharding import (
    check_parallelism,
    choose_wrap_units,
    is_sharded,
    live_trainable,
    main_decides,
    resharded_after,
    runs_main_work,
    trainable_names,
    whole_parameters,
)
from difftune.training.speed import apply_speed_settings, attention_kernel, autocast_dtype, to_device
from difftune.training.state import (
    CHECKPOINTS,
    list_checkpoints,
    restore_checkpoint,
)

logger = logging.getLogger(__name__)
FULL_DISK_BYTES = 64 * 2**20  # less free space than this after a failed write: the disk was full


class Trainer:
    """Diff-Tuning (or plain fine-tuning, by configuration) of a diffusion model.

    Args:
        cfg: the experiment configuration.
        loaded: a pre-loaded model (else loaded from ``cfg.model``).
        accelerator: an existing accelerator (else one is created from ``cfg.train``).
    """

    def __init__(
        self, cfg: ExperimentConfig, loaded: LoadedModel | None = None, accelerator: Accelerator | None = None
    ) -> None:
        self.cfg = cfg
        tc = cfg.train
        self.out = Path(tc.output_dir)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=tc.mixed_precision, log_with=tracker(tc.report_to), project_dir=str(self.out)
        )
        check_world_size(self.accelerator.num_processes)
        check_parallelism(self.accelerator, cfg)
        chunks = self.accelerator.num_processes * tc.gradient_accumulation
        if tc.batch_size < chunks:
            raise UserError(
                f"train.batch_size={tc.batch_size} is smaller than processes x gradient_accumulation = {chunks}"
            )
        RunLock(self.out).check_free()  # every process, before the target cache is written into the folder
        set_seed(tc.seed)
        self.parts = build_run(cfg, loaded, self.accelerator, self.out)
        self.cfg = self.parts.cfg  # objective.power.axis: auto made concrete for the model's process
        self.guard: NonFiniteGuard | None = None  # set by train()
        self.data_schedule: DataSchedule | None = None  # set by train() when a schedule is data_driven
        self.best: BestModel | None = None  # set by train() with train.keep_best, on the main process

    # the run's parts, as the loop and its callers name them
    loaded = property(lambda self: self.parts.loaded)
    backbone = property(lambda self: self.parts.backbone)
    process = property(lambda self: self.parts.process)
    target = property(lambda self: self.parts.target)
    bank = property(lambda self: self.parts.bank)
    state = property(lambda self: self.parts.state)
    n_target = property(lambda self: self.parts.n_target)
    n_bank = property(lambda self: self.parts.n_bank)

    def _validate(self, step: int) -> None:
        """Log condition fidelity at ``step`` when it is a validation step (on the main process; under
        sharding every process generates its share of the images, :func:`runs_main_work`)."""
        every, validation, acc = self.cfg.train.validation_every, self.parts.validation, self.accelerator
        if validation is None or step % every or not runs_main_work(acc):
            return
        backbone = acc.unwrap_model(self.model)
        with resharded_after(backbone):
            scores = validation.log(backbone, step, acc.device, self._shared)
        if scores is not None:
            acc.log({f"fidelity/{key}": value for key, value in scores.items()}, step=step)

    def _evaluate(self, step: int) -> None:
        """Score the model at ``step`` when it is an evaluation step (with its EMA weights when it has an
        EMA), log the scores, and keep it in ``best/`` when it is the best so far. The main process
        evaluates; under sharding every process takes its share, and only the main one writes."""
        tc, evaluation, acc = self.cfg.train, self.parts.evaluation, self.accelerator
        if evaluation is None or (step % tc.eval_every and step != tc.max_steps):
            return
        with ema_weights(self.ema, self.parts.trainable):
            with resharded_after(self.backbone):
                scores = evaluation.evaluate(acc.unwrap_model(self.model), acc.device, self._shared)
            improves = main_decides(acc, self.best is not None and self.best.improves(scores))
            if improves:
                with whole_parameters(acc, self.backbone):  # FSDP: gathered from the shards
                    if self.best is not None:
                        record = self.best.record(step, scores)
                        write_best(
                            self.out / BEST_DIR, self.loaded, self.target.class_names, self.cfg, record
                        )
        if acc.is_main_process:
            acc.log(scores, step=step)
            append_history(self.out, step, scores)

    def train(self) -> Path:
        """Run the loop to ``train.max_steps``; returns the directory of the final model.

        The output folder is locked for the run (:class:`~difftune.training.run_dir.RunLock`), and an earlier
        run in it is refused unless resumed or ``train.overwrite`` is set.

        Raises:
            UserError: the folder is in use or holds another run; the loss became non-finite
                (:class:`~difftune.training.divergence.TrainingDiverged`: no checkpoint is written from it).
        """
        lock = RunLock(self.out)
        try:
            with compact_model_state(self.accelerator, self.backbone):  # checkpoints hold what trains
                return self._train(claim_run_folder(self.accelerator, lock, self.out, self.cfg.train))
        finally:
            lock.release()

    def _train(self, resume: Path | None) -> Path:
        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        names = trainable_names(self.backbone, self.parts.trainable)
        optimizer = make_optimizer(self.parts.trainable, tc)
        apply_speed_settings(self.backbone, tc)
        if self.parts.frozen_teacher is not None:  # distillation's frozen copy runs as the student does
            apply_speed_settings(self.parts.frozen_teacher, tc)
        self._compile_unchecked = tc.compile != "no"
        choose_wrap_units(acc, self.backbone)
        model, optimizer = acc.prepare(self.backbone, optimizer)
        self.model, self.optimizer = model, optimizer
        # a sharded run's processes share its samples and evaluation (None: not sharded)
        self._shared = acc if is_sharded(acc) else None
        self.parts.trainable = live_trainable(self.backbone, names)  # under FSDP: the shards now in place
        self.ema = make_ema(self.parts.trainable, tc.ema_decay)
        if resume is not None:
            check_resume_config(self.cfg, resume)
            restore_checkpoint(acc, resume, self.state, self.ema, self.backbone)
            for group in optimizer.param_groups:  # this run's optimiser settings, not the checkpoint's
                group.update(optimizer_settings(tc))
            logger.info("resumed from %s at step %d", resume, self.state.step)
        objective, self.data_schedule, fit = run_objective(self.parts, acc, model, self.out, resume)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
            write_run_summary(self.out, self.parts.summary(acc, resume, fit))
            rewind_logs(self.out, self.state.step)
        acc.init_trackers("difftune", config=flat_config(cfg))
        self.best = (
            BestModel(self.out, tc.keep_best, self.state.step)
            if tc.keep_best and acc.is_main_process
            else None
        )
        log = TermLog(self.process.num_timesteps)
        self.guard = NonFiniteGuard(self.process.num_timesteps, tc.on_non_finite, tc.max_non_finite_steps)
        # only silence other ranks explicitly, so TQDM_DISABLE=1 still works on the main one
        quiet = {} if acc.is_local_main_process else {"disable": True}
        bar = tqdm(total=tc.max_steps, initial=self.state.step, desc="train", **quiet)
        learning_rate = LearningRateSchedule(tc)
        attention = attention_kernel(tc.sdpa_backend, acc.device, autocast_dtype(tc.mixed_precision))
        try:
            with attention:
                if self.state.step == 0:  # the curves start from the model before training
                    self._validate(0)
                    self._evaluate(0)
                model.train()
                while self.state.step < tc.max_steps:
                    rate = self._optimizer_step(objective, log, learning_rate)
                    if self.ema is not None:
                        self.ema.step(self.parts.trainable)
                    self.state.step += 1
                    bar.update(1)
                    step = self.state.step
                    if step % tc.log_every == 0 or step == tc.max_steps:
                        self.guard.check(acc, self._last_good())
                        weight = self._bank_weight(step - 1)  # the logged step's lambda
                        weight = objective.bank_weight if weight is None else weight
                        scalars = {**log.flush(acc, self.n_bank, weight), "lr": rate}
                        acc.log(scalars, step=step)
                        if acc.is_main_process:
                            append_history(self.out, step, scalars)
                        bar.set_postfix(loss=f"{scalars['loss/total']:.4f}")
                    self._validate(step)
                    if tc.sample_every and step % tc.sample_every == 0 and runs_main_work(acc):
                        grid = self.out / "samples" / f"step-{step:07d}.png"
                        with resharded_after(self.backbone):
                            save_sample_grid(
                                acc.unwrap_model(model),
                                self.loaded,
                                self.target.cond,
                                tc.sampling,
                                grid,
                                acc.device,
                                shared=self._shared,
                            )
                    self._evaluate(step)
                    if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == tc.max_steps:
                        self.save_checkpoint()
        finally:
            self.parts.prefetch.close()
            bar.close()  # also on an error, so its message starts on a line of its own
        final = self.out / "final"
        with whole_parameters(acc, self.backbone):  # FSDP: the frozen parts it writes, gathered
            if acc.is_main_process:
                write_final(final, list_checkpoints(self.out)[-1], self.loaded, self.target.class_names, cfg)
        acc.wait_for_everyone()
        acc.end_training()  # last: it destroys the process group that wait_for_everyone needs
        return final

    def _optimizer_step(
        self, objective: Objective, log: TermLog, learning_rate: LearningRateSchedule
    ) -> float:
        """One optimiser step on the batch of the current step (every micro-batch's forward and backward,
        clipping, the non-finite guard, the learning rate); returns the rate it stepped with."""
        tc, acc, model, optimizer = self.cfg.train, self.accelerator, self.model, self.optimizer
        params, chunks = self.parts.trainable, acc.num_processes * tc.gradient_accumulation
        x0, cond, is_bank, draw = self.parts.batch(self.state.step, objective)
        # this step's stream counts and lambda (objective.bank_curriculum)
        counts = (*self.parts.counts(self.state.step), self._bank_weight(self.state.step))
        for micro in range(tc.gradient_accumulation):
            sel = torch.arange(x0.shape[0])[micro * acc.num_processes + acc.process_index :: chunks]
            last = micro == tc.gradient_accumulation - 1
            inputs = (
                to_device(x0[sel], acc.device),
                cond.select(sel).to(acc.device),
                to_device(is_bank[sel], acc.device),
                draw[sel],
            )
            if self._compile_unchecked:
                self._compile_unchecked = False
                self._check_compile(objective, inputs, counts)
            # FSDP reduce-scatters every micro-batch: skipping it would keep whole gradients on every process
            with contextlib.nullcontext() if last or self._shared else acc.no_sync(model):
                terms = objective(model, *inputs)
                # global-count normalisation x processes: DDP's gradient mean becomes the global mean
                loss = objective.reduce(terms, *counts) * acc.num_processes
                acc.backward(loss)
            log.add(terms)
            self.guard.observe(self.state.step, terms)
        grad_norm = acc.clip_grad_norm_(params, tc.max_grad_norm) if tc.max_grad_norm > 0 else None
        skip = self.guard.skip_flag(self.state.step, params, acc, grad_norm)
        if skip is not None and acc.scaler is None:  # under fp16 the grad scaler skips by itself
            optimizer.optimizer.found_inf = skip
        rate = learning_rate.apply(optimizer, self.state.step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return rate

    def _bank_weight(self, step: int) -> float | None:
        """λ of ``step`` when ``objective.bank_curriculum.scale_weight`` varies it, else ``None`` (the objective's)."""
        objective = self.cfg.objective
        return bank_weight_at(objective, step) if objective.bank_curriculum.scale_weight else None

    def _check_compile(self, objective: Objective, inputs: tuple, counts: tuple) -> None:
        """Refuse a compiled backbone whose gradients on ``inputs`` differ from eager mode's
        (``counts``: the step's ``n_target``, ``n_bank`` and lambda, as :meth:`Objective.reduce` takes them)."""
        acc, model = self.accelerator, self.model

        def backward() -> None:
            with acc.no_sync(model):
                acc.backward(objective.reduce(objective(model, *inputs), *counts))

        trainable = {id(p) for p in self.parts.trainable}
        named = [(n, p) for n, p in self.backbone.named_parameters() if id(p) in trainable]
        check_compiled_gradients(backward, named, self.cfg.train.mixed_precision)

    def _last_good(self) -> str:
        found = list_checkpoints(self.out)
        return str(found[-1]) if found else f"those of {self.cfg.model.pretrained} (no checkpoint yet)"

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/checkpoint-<step>`` (model, EMA, resume state, config) and rotate old ones.

        Raises:
            TrainingDiverged: a loss since the last check was not finite; nothing is written.
            UserError: the disk is full (or another write error): the half-written checkpoint is
                removed, the earlier ones are untouched.
        """
        acc, step = self.accelerator, self.state.step
        if self.guard is not None:
            self.guard.check(acc, self._last_good())
        root = self.out / CHECKPOINTS
        final = root / f"checkpoint-{step:07d}"
        # a name every process knows (accelerate's save_state writes from all of them), so not atomic_directory
        tmp = root / f"checkpoint-{step:07d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            with sharded_trainable_only(acc, self.backbone):
                acc.save_state(str(tmp / "state"))
            write_checkpoint_files(
                acc,
                tmp,
                self.loaded,
                self.ema,
                self.parts.trainable,
                self.state,
                self.data_schedule,
                self.cfg,
            )
        except Exception as err:
            # a full disk comes as an OSError, a SafetensorError or torch.save's RuntimeError: judged by
            # the free space left, before the half-written checkpoint is removed
            full = shutil.disk_usage(root).free < FULL_DISK_BYTES
            shutil.rmtree(tmp, ignore_errors=True)
            if not (full or isinstance(err, (OSError, SafetensorError))):
                raise
            reason = "No space left on device" if full else getattr(err, "strerror", None) or str(err)
            raise UserError(
                f"could not write {final.name} ({reason}); the last complete checkpoint is "
                f"{self._last_good()}; free space or fix the folder, then resume with train.resume=latest"
            ) from None
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            rotate_checkpoints(self.out, self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()
        return final


def check_world_size(processes: int) -> None:
    """Refuse a launch whose processes do not form one run: ``torchrun`` (or a cluster launcher) set
    ``WORLD_SIZE`` but accelerate joined fewer processes, so each would train and write on its own.

    Raises:
        UserError: the launcher's world size differs from accelerate's process count.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != processes:
        raise UserError(
            f"the launcher started {world} processes (WORLD_SIZE) but accelerate runs {processes}, so they "
            "would train apart; on a machine without a GPU set ACCELERATE_USE_CPU=1 (or use "
            "`accelerate launch --multi_gpu`/`--num_processes` on GPUs)"
        )


def train_model(cfg: ExperimentConfig, loaded: LoadedModel | None = None) -> Path:
    """Fine-tune per ``cfg``; returns the final model directory."""
    return Trainer(cfg, loaded).train()
