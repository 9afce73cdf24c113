"""The run's side of data-driven schedules (docs/method.md §10): fit once, share, save, reload on resume.

A run whose ``objective.target_schedule`` or ``objective.bank_schedule`` is ``data_driven`` fits
both before its first step (:func:`~difftune.schedules.data_driven.fit_data_schedule`), on the
main process only; the others receive the fit by broadcast, so every process trains with the same
numbers. The fit is saved as ``<output_dir>/data_schedule.json`` and in every checkpoint's
``state/``; a resumed run loads it from there instead of fitting again, so it samples the same t.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difftune.backbones.conditioning import Conditioning
from difftune.errors import UserError
from difftune.io.mapped import MappedRows
from difftune.schedules.data_driven import DataSchedule, fit_data_schedule
from difftune.training.run_dir import DATA_SCHEDULE_FILE
from difftune.tuning import adapters_off

if TYPE_CHECKING:
    from accelerate import Accelerator

    from difftune.backbones.base import Backbone
    from difftune.config.experiment import ExperimentConfig
    from difftune.data.targets import TargetData

logger = logging.getLogger(__name__)
SETS = 2  # the fit runs the model on the target set and on the bank


def rows_per_pass(cfg: ExperimentConfig) -> int:
    """The most samples of one forward pass of the fit: the run's micro-batch without its process split.

    It does not depend on the number of processes (the fit runs on one), so 1 or N processes fit
    the same schedules.
    """
    return cfg.train.batch_size // cfg.train.gradient_accumulation


def planned_fit(cfg: ExperimentConfig) -> str:
    """What the fit will cost, in one line (for ``train --dry-run``)."""
    oc = cfg.objective
    passes = SETS * oc.data_driven.bins * oc.data_driven.draws
    return (
        f"{' and '.join(oc.fitted_schedules)} data_driven: fitted before training: {passes} forward passes "
        f"({SETS} sets x {oc.data_driven.bins} bins x {oc.data_driven.draws} draws) of up to "
        f"{rows_per_pass(cfg)} samples, no gradients"
    )


def fit_for_run(
    cfg: ExperimentConfig,
    backbone: Backbone,
    scheduler_config: dict[str, Any],
    target: TargetData,
    bank: torch.Tensor | MappedRows,
    bank_cond: Conditioning,
    device: torch.device | str,
) -> DataSchedule:
    """Fit the run's schedules on its target set and bank, with the conditions training gives them.

    Target rows keep their condition (no guidance drop); bank rows get the unconditional form
    under ``bank.condition: null`` and their own under ``own``. The pre-trained function is the
    model with its tuning switched off. Target rows are a seeded (``train.seed``) random subset of
    the size the fit uses, each a posterior draw as in training.
    """
    oc, seed = cfg.objective, cfg.train.seed
    rows = min(rows_per_pass(cfg), len(target), bank.shape[0])
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(target), generator=g)[: oc.data_driven.bins * oc.data_driven.draws * rows]
    if cfg.bank.condition == "null":
        bank_cond = backbone.drop(bank_cond, torch.ones(bank_cond.batch_size, dtype=torch.bool))
    with adapters_off(backbone):
        return fit_data_schedule(
            backbone,
            scheduler_config,
            target.draw(chosen, g),
            target.cond.select(chosen),
            bank,
            bank_cond,
            num_bins=oc.data_driven.bins,
            draws_per_bin=oc.data_driven.draws,
            seed=seed,
            batch_size=rows,
            device=device,
        )


def saved_fit(output_dir: Path, resume: Path) -> DataSchedule | None:
    """The fit a resumed run must reuse: the checkpoint's copy, else the run folder's, else ``None``."""
    for path in (resume / "state" / DATA_SCHEDULE_FILE, output_dir / DATA_SCHEDULE_FILE):
        if path.is_file():
            return DataSchedule.load(path)
    return None


def run_data_schedule(
    cfg: ExperimentConfig,
    accelerator: Accelerator,
    fit: Callable[[], DataSchedule],
    output_dir: Path,
    resume: Path | None,
) -> tuple[DataSchedule | None, dict[str, Any] | None]:
    """The run's fitted schedules and their record for ``run_summary.json`` (``None`` without ``data_driven``).

    Args:
        fit: ``() -> DataSchedule``, called on the main process when there is no saved fit to reuse.
        resume: the checkpoint the run resumes from, or ``None``.

    Raises:
        UserError: the saved fit is damaged, or the main process could not fit (every process raises).
    """
    if not cfg.objective.fitted_schedules:
        return None, None
    payload: list[dict[str, Any] | None] = [None]
    failure: Exception | None = None
    if accelerator.is_main_process:
        try:
            found = None if resume is None else saved_fit(output_dir, resume)
            if resume is not None and found is None:
                logger.warning(
                    "%s holds no fitted schedule (written by another config); fitting it now", resume
                )
            schedule = found or fit()
            schedule.save(output_dir / DATA_SCHEDULE_FILE)  # also when loaded: the folder may be a new one
            payload[0] = {"fit": schedule.to_dict(), "refitted": found is None}
        except Exception as err:  # told to every process, so none waits for a fit that never comes
            failure, payload[0] = err, {"error": f"{type(err).__name__}: {err}"}
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(payload)
    if failure is not None:
        raise failure
    shared = payload[0] or {}
    if "error" in shared:
        raise UserError(f"the main process could not fit the data-driven schedules ({shared['error']})")
    schedule = DataSchedule.from_dict(shared["fit"])
    how = "fitted" if shared["refitted"] else "reused, not refitted"
    if accelerator.is_main_process:
        print(f"[difftune] {schedule.summary()}; {how}: {output_dir / DATA_SCHEDULE_FILE}")
    record = {
        "file": DATA_SCHEDULE_FILE,
        "refitted": shared["refitted"],
        "forward_passes": schedule.forward_passes,
        "seconds": schedule.seconds,
        "uniform": schedule.uniform,
    }
    return schedule, record
