"""The accelerate training loop: one forward pass over target + bank samples per micro-batch.

The loop knows nothing of a specific model, space, tuning method or weighting: the backbone adapter
(and its conditioning), the codec's prepared target data, the tuning method's trainable parameters
and the objective (:mod:`difftune.objectives`) are given to it (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from difftune.backbones.adapters import adapter_directory, apply_tuning, continue_adapter
from difftune.backbones.base import enable_gradient_checkpointing
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.loading import LoadedModel, load_pretrained
from difftune.backbones.saving import save_model, save_pipeline_index
from difftune.bank.conditions import training_bank
from difftune.config.experiment import ExperimentConfig
from difftune.control.validation import check_validation
from difftune.data.targets import prepare_target
from difftune.errors import UserError
from difftune.io.atomic import atomic_directory
from difftune.objectives import Draw, Objective, build_objective
from difftune.objectives.term_log import TermLog
from difftune.process import build_process
from difftune.schedules.data_driven import DataSchedule
from difftune.training.divergence import NonFiniteGuard
from difftune.training.fitted_schedule import fit_for_run, run_data_schedule
from difftune.training.outputs import (
    append_history,
    fidelity_validation,
    flat_config,
    save_sample_grid,
)
from difftune.training.run_dir import (
    DATA_SCHEDULE_FILE,
    RunLock,
    check_resume_config,
    prepare_output_dir,
    rewind_logs,
    rotate_checkpoints,
    write_run_summary,
)
from difftune.training.state import (
    CHECKPOINTS,
    LoopState,
    list_checkpoints,
    resolve_resume,
    restore_checkpoint,
    save_run_state,
)
from difftune.training.streams import IndexStream, step_generator
from difftune.tuning.size import check_adapter_size

logger = logging.getLogger(__name__)


class Trainer:
    """Diff-Tuning (or plain fine-tuning, by configuration) of a class-conditional model.

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
            mixed_precision=tc.mixed_precision, log_with="tensorboard", project_dir=str(self.out)
        )
        acc = self.accelerator
        chunks = acc.num_processes * tc.gradient_accumulation
        if tc.batch_size < chunks:
            raise UserError(
                f"train.batch_size={tc.batch_size} is smaller than processes x gradient_accumulation = {chunks}"
            )
        RunLock(self.out).check_free()  # every process, before the target cache is written into the folder
        set_seed(tc.seed)
        if loaded is None and adapter_directory(cfg.model.pretrained) is not None:  # train an adapter further
            self.loaded, self.trainable = continue_adapter(cfg.model.pretrained, cfg.model.tuning, cfg.tuning)
        else:
            self.loaded = loaded or load_pretrained(
                cfg.model.pretrained,
                cfg.model.subfolder,
                cfg.model.vae,
                cfg.model.revision,
                cfg.model.controlnet,
            )
            self.trainable = apply_tuning(self.loaded, cfg.model.tuning, cfg.tuning)
        self.backbone = self.loaded.backbone
        check_adapter_size(cfg.model.tuning, cfg.tuning, self.backbone)  # before anything is written
        if tc.gradient_checkpointing:
            enable_gradient_checkpointing(self.backbone.inner)
        self.guard: NonFiniteGuard | None = None  # set by train()
        self.process = build_process(self.loaded.scheduler_config)
        # data_driven schedules are fitted on the target set and the bank (or reloaded) by train(),
        # and their objective is built then
        self.data_schedule: DataSchedule | None = None
        self._data_schedule_record: dict[str, Any] | None = None
        self.objective = None if cfg.objective.fitted_schedules else self._build_objective()
        check_validation(tc.validation_every, self.backbone, cfg.data.annotator)  # before anything is encoded
        # the bank first: a mismatched or damaged bank is refused before the target set is encoded
        self.bank, self.bank_cond = training_bank(cfg, self.loaded)
        with self.accelerator.main_process_first():
            cache_dir = Path(cfg.data.cache_dir or self.out / "target_cache")
            self.target = prepare_target(cfg.data, self.loaded, cache_dir, self.accelerator.device)
        self.validation = fidelity_validation(cfg, self.loaded, self.target.cond, self.out)
        self.n_bank = cfg.bank_count  # retention samples per batch, from the bank or the target set
        self.n_target = tc.batch_size - self.n_bank
        retention_pool = self.bank.shape[0] if cfg.uses_bank else len(self.target)
        self.state = LoopState(
            target=IndexStream(len(self.target), tc.seed),
            bank=IndexStream(retention_pool, tc.seed + 1) if self.n_bank else None,
        )

    def _build_objective(self) -> Objective:
        return build_objective(self.cfg.objective, self.process, self.backbone, self.data_schedule)

    def _fit_data_schedule(self, resume: Path | None) -> None:
        """Fit the data_driven schedules (main process; shared with the others), or reload the resumed run's fit."""
        acc = self.accelerator
        fit = partial(
            fit_for_run,
            self.cfg,
            acc.unwrap_model(self.model),
            self.loaded.scheduler_config,
            self.target,
            self.bank,
            self.bank_cond,
            acc.device,
        )
        self.data_schedule, self._data_schedule_record = run_data_schedule(
            self.cfg, acc, fit, self.out, resume
        )
        if self.objective is None:
            self.objective = self._build_objective()

    def _validate(self, step: int) -> None:
        """Log condition fidelity at ``step`` when it is a validation step (main process only)."""
        every = self.cfg.train.validation_every
        if self.validation is None or step % every or not self.accelerator.is_main_process:
            return
        backbone = self.accelerator.unwrap_model(self.model)
        scores = self.validation.log(backbone, step, self.accelerator.device)
        self.accelerator.log({f"fidelity/{key}": value for key, value in scores.items()}, step=step)

    def _batch(self, step: int) -> tuple[torch.Tensor, Conditioning, torch.Tensor, Draw]:
        """The global batch of ``step``: x0 (B, C, H, W), conditions (guidance drop applied), is_bank (B,), draw.

        Bank samples (or the target samples of the retention stream, with
        ``objective.retention_data: target``) train the unconditional branch (docs/method.md §2):
        their condition is dropped (``bank.condition: null``: the null label, the empty prompt; a
        ControlNet keeps the control image), or kept (``own``).
        """
        g = step_generator(self.cfg.train.seed, step)
        idx = self.state.target.take(self.n_target)
        parts, conds = [self.target.draw(idx, g)], [self.target.cond.select(idx)]
        if self.n_bank:
            retained = self.state.bank.take(self.n_bank)
            if self.cfg.uses_bank:
                parts.append(self.bank[retained])
                retained_cond = self.bank_cond.select(retained)
            else:
                parts.append(self.target.draw(retained, g))
                retained_cond = self.target.cond.select(retained)
            if self.cfg.bank.condition == "null":
                retained_cond = self.backbone.drop(retained_cond, torch.ones(self.n_bank, dtype=torch.bool))
            conds.append(retained_cond)
        x0 = torch.cat(parts)
        cond = Conditioning.cat(conds)
        is_bank = torch.arange(x0.shape[0]) >= self.n_target
        draw = self.objective.draw(self.n_target, self.n_bank, tuple(x0.shape[1:]), g)
        return x0, self.backbone.drop(cond, draw.drop), is_bank, draw

    def train(self) -> Path:
        """Run the loop to ``train.max_steps``; returns the directory of the final model.

        The output folder is locked for the run (:class:`~difftune.training.run_dir.RunLock`), and an earlier
        run in it is refused unless resumed or ``train.overwrite`` is set.

        Raises:
            UserError: the folder is in use or holds another run; the loss became non-finite
                (:class:`~difftune.training.divergence.TrainingDiverged`: no checkpoint is written from it).
        """
        acc = self.accelerator
        lock = RunLock(self.out)
        try:
            # one process takes the folder and picks the checkpoint; the others learn both from it
            # (a broadcast, which is also a barrier: no process waits for one that gave up)
            outcome: list[str | None] = [None, None]  # [refusal, checkpoint to resume from]
            if acc.is_main_process:
                try:
                    lock.acquire()
                    resume = resolve_resume(self.out, self.cfg.train.resume)
                    prepare_output_dir(self.out, resume, self.cfg.train.overwrite)
                    outcome[1] = None if resume is None else str(resume)
                except UserError as err:
                    outcome[0] = str(err)
            if acc.num_processes > 1:
                broadcast_object_list(outcome)
            if outcome[0] is not None:
                raise UserError(outcome[0])
            return self._train(None if outcome[1] is None else Path(outcome[1]))
        finally:
            lock.release()

    def _train(self, resume: Path | None) -> Path:
        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        params = self.trainable
        optimizer = torch.optim.AdamW(
            params,
            lr=tc.learning_rate,
            betas=(tc.adam_beta1, tc.adam_beta2),
            eps=tc.adam_eps,
            weight_decay=tc.weight_decay,
            fused=True
            if tc.on_non_finite == "skip"
            else None,  # fused AdamW reads the skip flag on the device
        )
        self.ema = None
        if tc.ema_decay > 0:
            # constant decay from the first step, as DiT: min_decay = decay, update_after_step = -1
            self.ema = EMAModel(
                params, decay=tc.ema_decay, min_decay=tc.ema_decay, update_after_step=-1, foreach=True
            )
        model, optimizer = acc.prepare(self.backbone, optimizer)
        self.model, self.optimizer = model, optimizer
        if resume is not None:
            check_resume_config(self.cfg, resume)
            restore_checkpoint(acc, resume, self.state, self.ema)
            for group in optimizer.param_groups:  # this run's optimiser settings, not the checkpoint's
                group.update(
                    lr=tc.learning_rate,
                    betas=(tc.adam_beta1, tc.adam_beta2),
                    eps=tc.adam_eps,
                    weight_decay=tc.weight_decay,
                )
            logger.info("resumed from %s at step %d", resume, self.state.step)
        self._fit_data_schedule(resume)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
            write_run_summary(self.out, self._summary(resume))
            rewind_logs(self.out, self.state.step)
        acc.init_trackers("difftune", config=flat_config(cfg))
        log = TermLog(self.process.num_timesteps)
        self.guard = NonFiniteGuard(self.process.num_timesteps, tc.on_non_finite, tc.max_non_finite_steps)
        # only silence other ranks explicitly, so TQDM_DISABLE=1 still works on the main one
        quiet = {} if acc.is_local_main_process else {"disable": True}
        bar = tqdm(total=tc.max_steps, initial=self.state.step, desc="train", **quiet)
        chunks = acc.num_processes * tc.gradient_accumulation
        try:
            if self.state.step == 0:
                self._validate(0)  # the curve starts from the model before training
            model.train()
            while self.state.step < tc.max_steps:
                x0, cond, is_bank, draw = self._batch(self.state.step)
                for micro in range(tc.gradient_accumulation):
                    sel = torch.arange(x0.shape[0])[micro * acc.num_processes + acc.process_index :: chunks]
                    last = micro == tc.gradient_accumulation - 1
                    with contextlib.nullcontext() if last else acc.no_sync(model):
                        terms = self.objective(
                            model,
                            x0[sel].to(acc.device),
                            cond.select(sel).to(acc.device),
                            is_bank[sel].to(acc.device),
                            draw[sel],
                        )
                        # global-count normalisation x processes: DDP's gradient mean becomes the global mean
                        loss = self.objective.reduce(terms, self.n_target, self.n_bank) * acc.num_processes
                        acc.backward(loss)
                    log.add(terms)
                    self.guard.observe(self.state.step, terms)
                grad_norm = acc.clip_grad_norm_(params, tc.max_grad_norm) if tc.max_grad_norm > 0 else None
                skip = self.guard.skip_flag(self.state.step, params, acc, grad_norm)
                if skip is not None and acc.scaler is None:  # under fp16 the grad scaler skips by itself
                    optimizer.optimizer.found_inf = skip
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.step(params)
                self.state.step += 1
                bar.update(1)
                step = self.state.step
                if step % tc.log_every == 0 or step == tc.max_steps:
                    self.guard.check(acc, self._last_good())
                    scalars = log.flush(acc, self.n_bank, self.objective.bank_weight)
                    acc.log(scalars, step=step)
                    if acc.is_main_process:
                        append_history(self.out, step, scalars)
                    bar.set_postfix(loss=f"{scalars['loss/total']:.4f}")
                self._validate(step)
                if tc.sample_every and step % tc.sample_every == 0 and acc.is_main_process:
                    grid = self.out / "samples" / f"step-{step:07d}.png"
                    backbone = acc.unwrap_model(model)
                    save_sample_grid(backbone, self.loaded, self.target.cond, tc.sampling, grid, acc.device)
                if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == tc.max_steps:
                    self.save_checkpoint()
        finally:
            bar.close()  # also on an error, so its message starts on a line of its own
        final = self.out / "final"
        if acc.is_main_process:
            with atomic_directory(final) as staging:  # a crash never leaves a half-written final/
                shutil.copytree(list_checkpoints(self.out)[-1] / "model", staging, dirs_exist_ok=True)
                save_pipeline_index(self.loaded, staging, self.target.class_names)
                cfg.save(staging / "config.yaml")
        acc.wait_for_everyone()
        acc.end_training()  # last: it destroys the process group that wait_for_everyone needs
        return final

    def _summary(self, resume: Path | None) -> dict[str, Any]:
        """What this run trains on and how: printed at the start and saved as ``run_summary.json``."""
        n_trainable = sum(p.numel() for p in self.trainable)
        n_total = sum(p.numel() for p in self.backbone.parameters())
        return {
            "model": self.cfg.model.pretrained,
            "tuning": self.cfg.model.tuning,
            "trainable_parameters": n_trainable,
            "trainable_share": n_trainable / max(n_total, 1),
            "target_samples": len(self.target),
            "classes": {name: label for label, name in enumerate(self.target.class_names)},
            "bank_samples": int(self.bank.shape[0]),
            "retention": {"objective": self.cfg.objective.kind, "data": self.cfg.objective.retention_data},
            "batch": {"target": self.n_target, "bank": self.n_bank},
            "max_steps": self.cfg.train.max_steps,
            "default_steps": self.cfg.default_steps,  # train.max_steps left out of the config
            "resume_from": None if resume is None else {"checkpoint": str(resume), "step": self.state.step},
            "processes": self.accelerator.num_processes,
            "device": str(self.accelerator.device),
            "data_schedule": self._data_schedule_record,
        }

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
            acc.save_state(str(tmp / "state"))
            if acc.is_main_process:
                save_run_state(tmp / "state", self.state, self.ema)
                if self.data_schedule is not None:
                    self.data_schedule.save(tmp / "state" / DATA_SCHEDULE_FILE)
                save_model(self.loaded, tmp / "model", self.ema)
                self.cfg.save(tmp / "config.yaml")
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(
                f"could not write {final.name} ({err.strerror or err}); the last complete checkpoint is "
                f"{self._last_good()}; free space or fix the folder, then resume with train.resume=latest"
            ) from None
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            rotate_checkpoints(self.out, self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()
        return final


def train_model(cfg: ExperimentConfig, loaded: LoadedModel | None = None) -> Path:
    """Fine-tune per ``cfg``; returns the final model directory."""
    return Trainer(cfg, loaded).train()
