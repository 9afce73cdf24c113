"""One run per output folder, and no run silently mixed with, or destroying, an earlier one.

* :class:`RunLock`: ``<output_dir>/difftune.lock`` (host and process id) is taken for the length
  of a run; a second run into the same folder is refused. A lock whose process is gone (a killed
  run on this host) is taken over with a warning.
* :func:`prepare_output_dir`: a fresh run into a folder that holds checkpoints or ``final/`` of an
  earlier run is refused unless ``train.overwrite`` is set (or the run resumes); resuming from a
  checkpoint older than the folder's newest is refused too, as rotation would delete the new
  checkpoints and ``resume=latest`` would later pick the abandoned ones.
* :func:`rotate_checkpoints` and :func:`remove_partial_checkpoints`: rotation renames before it
  deletes, and a run's start clears what a killed run left half-written or half-deleted, so a run
  never holds more than ``keep_checkpoints`` + 1 checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import yaml

from difftune.config.experiment import setting_default
from difftune.config.renames import upgrade
from difftune.config.sections import flatten
from difftune.config.train import TrainConfig, default_steps_note
from difftune.control.log import FIDELITY_FILE
from difftune.errors import UserError
from difftune.io.atomic import atomic_write_json, atomic_write_text, process_alive
from difftune.training.state import (
    CHECKPOINTS,
    checkpoint_problem,
    checkpoint_step,
    list_checkpoints,
    resolve_resume,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from difftune.config.experiment import ExperimentConfig

logger = logging.getLogger(__name__)
LOCK_FILE = "difftune.lock"
DATA_SCHEDULE_FILE = "data_schedule.json"  # the fitted data_driven schedules (docs/method.md §10)
HISTORY = "metrics.jsonl"  # the logged scalars, one JSON line per log step
# the logs a run appends to, one JSON line with its "step" each; rewound on resume (rewind_logs)
LOG_FILES = (HISTORY, FIDELITY_FILE)
# written by a run; replaced by an overwriting run
RUN_FILES = (*LOG_FILES, "config.yaml", DATA_SCHEDULE_FILE)
BEST_DIR = "best"  # train.keep_best's model
RUN_DIRS = (CHECKPOINTS, "final", BEST_DIR, "samples", "difftune")  # the last is TensorBoard's
DELETING = ".deleting"  # suffix of a checkpoint that rotation is deleting


class RunLock:
    """An exclusive lock on an output folder for one run (a context manager).

    Args:
        output_dir: the run's folder (created if missing).

    Raises:
        UserError: another live run holds the folder (the message names it and the lock file).
    """

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def check_free(self) -> None:
        """Refuse early, before anything is written, if a live run holds the folder (takes nothing).

        Raises:
            UserError: another live run holds the folder.
        """
        if self.path.is_file() and not self._stale():
            self._refuse()

    def acquire(self) -> None:
        """Take the lock, or take over one left by a run that was killed on this host."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    logger.warning(
                        "taking over %s, left by process %s that no longer runs",
                        self.path,
                        self._holder()["pid"],
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                self._refuse()
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path}; delete it if no run uses the folder")

    def _stale(self) -> bool:
        """The lock was left by a process of this host that no longer runs."""
        holder = self._holder()
        return holder.get("host") == socket.gethostname() and not process_alive(int(holder.get("pid", -1)))

    def _refuse(self) -> None:
        holder = self._holder()
        raise UserError(
            f"{self.path.parent} is in use by another run (process {holder.get('pid')} on "
            f"{holder.get('host')}); use another train.output_dir, or delete {self.path} if that run is gone"
        ) from None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a lock being written, or torn by a kill: treated as held by an unknown process

    def release(self) -> None:
        """Give the lock back (only if this object holds it)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


def prepare_output_dir(output_dir: str | os.PathLike[str], resume: Path | None, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, clear) what an earlier run left in ``output_dir``.

    Args:
        output_dir: the run's folder.
        resume: the checkpoint this run resumes from, or ``None`` for a fresh run.
        overwrite: delete the earlier run's checkpoints, ``final/``, samples and logs first (fresh
            run), or the checkpoints newer than ``resume`` (resumed run).

    Raises:
        UserError: the folder holds an earlier run and ``overwrite`` is not set.
    """
    out = Path(output_dir)
    remove_partial_checkpoints(out)
    found = list_checkpoints(out)
    if resume is None:
        if not found and not (out / "final").exists():
            return
        if not overwrite:
            raise UserError(
                f"{out} holds an earlier run ({len(found)} checkpoints"
                f"{', final/' if (out / 'final').exists() else ''}); resume it with --set train.resume=latest, "
                "replace it with --set train.overwrite=true, or choose another train.output_dir"
            )
        for name in RUN_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        return
    later = [c for c in found if checkpoint_step(c) > checkpoint_step(resume)]
    damaged = [c for c in later if checkpoint_problem(c) is not None]
    for checkpoint in damaged:  # kept for inspection, out of the way of resume and rotation
        checkpoint.rename(checkpoint.with_name(f"damaged-{checkpoint.name}"))
        logger.warning("moved the damaged %s aside to damaged-%s", checkpoint, checkpoint.name)
    later = [c for c in later if c not in damaged]
    if later and not overwrite:
        raise UserError(
            f"resuming from {resume.name} would abandon {len(later)} newer checkpoints in {out / CHECKPOINTS} "
            f"(newest {later[-1].name}); resume from train.resume=latest, or set train.overwrite=true to delete them"
        )
    for checkpoint in later:
        shutil.rmtree(checkpoint)


def rotate_checkpoints(output_dir: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints.

    Each is renamed ``checkpoint-N.deleting`` first (one atomic step), then deleted, so a kill during
    the deletion leaves no half-deleted directory that would pass for a checkpoint, and the next
    run's start (:func:`remove_partial_checkpoints`) finishes the job. The newest checkpoint is
    never deleted.
    """
    for old in list_checkpoints(output_dir)[:-keep]:
        doomed = old.with_name(old.name + DELETING)
        old.rename(doomed)
        shutil.rmtree(doomed)


def remove_partial_checkpoints(output_dir: str | os.PathLike[str]) -> None:
    """Delete what a killed run left half-done: checkpoints being written (``.tmp``) or deleted."""
    root = Path(output_dir) / CHECKPOINTS
    for leftover in sorted(root.glob("checkpoint-*")) if root.is_dir() else []:
        if leftover.is_dir() and leftover.name.endswith((".tmp", DELETING)):
            logger.info("removing %s, left by a run that was stopped", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def rewind_logs(output_dir: str | os.PathLike[str], step: int) -> None:
    """Drop the lines of every log in :data:`LOG_FILES` that a run starting at ``step`` writes again.

    A run resumed at ``step`` > 0 logs the steps after it again; one that starts at step 0 (a fresh
    run, or one killed before its first checkpoint) logs everything again, step 0's validation
    included. A line torn by a kill is dropped too.
    """
    for name in LOG_FILES:
        path = Path(output_dir) / name
        if path.is_file():
            lines = path.read_text().splitlines() if step > 0 else []
            kept = [line for line in lines if _logged_step(line) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    """The step of a log line; a line torn by a kill counts as after every step (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


# keys of the command that runs, not of the run: where its folder is (a moved run folder resumes) and
# how this command starts it; they differ between a checkpoint and its resumption as a rule, unreported
INVOCATION_KEYS = {"train.output_dir", "train.resume", "train.overwrite", "train.accept_config_changes"}
# keys that may change between a checkpoint and the run resuming it: how often things are written,
# how long to run, and how grids are drawn; the optimiser's keys are applied to the restored
# optimiser (the learning rate is a function of the step, so its schedule may change too), and the
# speed switches change how steps are computed, not what they compute. Any other change (data, model,
# objective, batch, seed, optimiser kind, ...) would make the resumed run a different run, and needs
# train.accept_config_changes.
RESUMABLE_CHANGES = {
    *(
        f"train.{key}"
        for key in (
            "max_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "sample_every",
            "eval_every",
            "keep_best",
            "sampling.steps",
            "sampling.scheduler",
            "sampling.guidance_scale",
            "sampling.seed",
            "learning_rate",
            "weight_decay",
            "adam_beta1",
            "adam_beta2",
            "adam_eps",
            "max_grad_norm",
            "on_non_finite",
            "max_non_finite_steps",
            "lr_scheduler",
            "lr_warmup_steps",
            "lr_num_cycles",
            "lr_power",
            "allow_tf32",
            "compile",
            "channels_last",
            "sdpa_backend",
            "report_to",
        )
    ),
    "data.cache_dir",
    "bank.batch_size",
}


# settings whose default has changed since they were added: what a checkpoint without them ran with
# (objective.power.axis was added as index; its default is now auto, which a run resolves to a concrete
# port before comparing, index on DDPM)
DEFAULTS_WHEN_ADDED = {"objective.power.axis": "index"}


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """The differences between a checkpoint's config and the resuming run's (both nested mappings in
    the new spelling), as ``section.key: old -> new`` (``section.sub.key`` in a sub-section).

    The keys of :data:`INVOCATION_KEYS` (``train.output_dir``, ``train.resume``, ...) are not compared.

    Returns:
        (changes that resuming allows, changes that make it another run).
    """
    allowed, other = [], []
    old, new = flatten(saved), flatten(current)
    for key in sorted(set(old) | set(new)):
        if key in INVOCATION_KEYS:
            continue  # not a setting of the run
        # a setting added to difftune since the checkpoint was written: the run had its default then
        before = old[key] if key in old else DEFAULTS_WHEN_ADDED.get(key, setting_default(key))
        if before is dataclasses.MISSING:
            continue
        if before != new.get(key):
            line = f"{key}: {before!r} -> {new.get(key)!r}"
            (allowed if key in RESUMABLE_CHANGES else other).append(line)
    return allowed, other


def write_run_summary(output_dir: Path, summary: dict) -> None:
    """Save ``run_summary.json`` in the run's folder and print the summary in a few lines."""
    atomic_write_json(output_dir / "run_summary.json", summary)
    classes = summary["classes"]
    table = ", ".join(f"{name}={label}" for name, label in list(classes.items())[:12])
    resumed = summary["resume_from"]
    grouping = (
        f"in {len(classes)} classes ({table}{', ...' if len(classes) > 12 else ''})"
        if classes
        else "with captions"
    )
    print(
        f"[difftune] {summary['target_samples']} target images {grouping}; bank {summary['bank_samples']} samples; "
        f"batch {summary['batch']['target']} target + {summary['batch']['bank']} bank; "
        f"{summary['tuning']} tuning, {summary['trainable_parameters']:,} trainable parameters "
        f"({100 * summary['trainable_share']:.1f}%); "
        + (f"resuming at step {resumed['step']}" if resumed else "fresh run")
    )
    buckets = summary.get("buckets")
    if buckets:  # data.buckets: each step's rows come from one of them
        rows = ", ".join(f"{name} ({n})" for name, n in buckets["rows"].items())
        left_out = (
            f"; left out (too few for a step): {', '.join(buckets['left_out'])}"
            if buckets["left_out"]
            else ""
        )
        print(f"[difftune] target rows per bucket: {rows}{left_out}")
    if summary.get("default_steps"):
        print(f"[difftune] {default_steps_note(summary['max_steps'])}")


def check_resume_config(cfg: ExperimentConfig, checkpoint: Path) -> None:
    """List how this run's config differs from the checkpoint's; refuse a different run.

    Raises:
        UserError: data, model, objective, batch or seed changed and ``train.accept_config_changes``
            is not set (the message lists the first changes).
    """
    path = checkpoint / "config.yaml"
    if not path.is_file():
        return
    # a checkpoint of an older difftune spells some keys the old way: compared in the new spelling,
    # without deprecation lines (the file is the run's, not the user's to change)
    saved = upgrade(yaml.safe_load(path.read_text()) or {}, warn=False)
    allowed, other = config_changes(saved, cfg.to_dict())
    if allowed or other:
        logger.warning("resuming %s with changed settings: %s", checkpoint.name, "; ".join(allowed + other))
    if other and not cfg.train.accept_config_changes:
        raise UserError(
            f"{checkpoint} was written with other settings ({'; '.join(other[:3])}"
            f"{'; ...' if len(other) > 3 else ''}); resume with the same config, or set "
            "train.accept_config_changes=true"
        )


def claim_run_folder(accelerator: Accelerator, lock: RunLock, out: Path, tc: TrainConfig) -> Path | None:
    """Take the run folder for this run and pick the checkpoint to resume from (``None``: a new run).

    One process takes the folder and picks the checkpoint; the others learn both from it (a broadcast,
    which is also a barrier: no process waits for one that gave up).

    Raises:
        UserError: on every process, when the folder is in use or holds another run.
    """
    outcome: list[str | None] = [None, None]  # [refusal, checkpoint to resume from]
    if accelerator.is_main_process:
        try:
            lock.acquire()
            resume = resolve_resume(out, tc.resume)
            prepare_output_dir(out, resume, tc.overwrite)
            outcome[1] = None if resume is None else str(resume)
        except UserError as err:
            outcome[0] = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome)
    if outcome[0] is not None:
        raise UserError(outcome[0])
    return None if outcome[1] is None else Path(outcome[1])
