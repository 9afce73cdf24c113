"""The ψ and ξ a run trained with: its two streams' timestep densities, rebuilt from its config and its
model's noise schedule by the objective's own code (:func:`difftune.objectives.build_objective`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from difftune.report.run import RunRecord

logger = logging.getLogger(__name__)
SCHEDULER_FILE = Path("scheduler") / "scheduler_config.json"
DATA_SCHEDULE_FILE = "data_schedule.json"  # as difftune.training.run_dir.DATA_SCHEDULE_FILE


@dataclass(frozen=True)
class Densities:
    """A run's timestep densities as importance weights ``T · p(t)`` over t = 0..T−1 (0 the least noisy).

    Attributes:
        process: the forward process (``ddpm``, ``flow``, ``edm``).
        target, bank: ψ and ξ (mean 1 over t).
        target_name, bank_name: the schedules' names (with their settings).
        bank_used: whether the retention stream trains (``objective.bank_share`` > 0).
        source: where the noise schedule was read.
    """

    process: str
    target: list[float]
    bank: list[float]
    target_name: str
    bank_name: str
    bank_used: bool
    source: str


def scheduler_sources(run: RunRecord) -> list[Path]:
    """The model folders that may hold the run's noise schedule, in the order they are tried: ``final/``,
    ``best/``, the checkpoints (newest first), then the pre-trained model when it is a local folder."""
    path = run.path
    folders = [path / "final", path / "best"]
    checkpoints = sorted((path / "checkpoints").glob("checkpoint-*"), reverse=True)
    folders += [c / "model" for c in checkpoints]
    pretrained = getattr(getattr(run.config, "model", None), "pretrained", None)
    if pretrained:
        folders.append(Path(pretrained).expanduser())
    return folders


def _sample_shape(folder: Path) -> tuple[int, int, int] | None:
    """(C, H, W) of the model in ``folder`` from its network's config (``in_channels``, ``sample_size``),
    for a flow schedule whose shift depends on the resolution; None if it cannot be read."""
    for sub in ("transformer", "unet"):
        try:
            config = json.loads((folder / sub / "config.json").read_text())
            size = config["sample_size"]
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            return int(config["in_channels"]), int(h), int(w)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _schedule(run: RunRecord) -> tuple[dict[str, Any], Path] | None:
    """The first readable scheduler config of :func:`scheduler_sources` and its model folder."""
    for folder in scheduler_sources(run):
        try:
            return json.loads((folder / SCHEDULER_FILE).read_text()), folder
        except (OSError, ValueError):
            continue
    return None


def timestep_densities(run: RunRecord) -> Densities | str:
    """ψ and ξ of ``run``, or one line saying why they cannot be built (never raises)."""
    if run.config is None:
        return "ψ/ξ not shown: the run's config.yaml could not be read"
    found = _schedule(run)
    if found is None:
        return (
            "ψ/ξ not shown: no noise schedule found (final/, best/ or a checkpoint's scheduler/, or the "
            "pre-trained model's scheduler/scheduler_config.json)"
        )
    schedule, folder = found
    try:
        return _densities(run, schedule, folder)
    except Exception as err:  # an optional figure: whatever stops it becomes the note, not a crash
        logger.debug("densities of %s", run.path, exc_info=True)
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"ψ/ξ not shown: {message}"


def _densities(run: RunRecord, schedule: dict[str, Any], folder: Path) -> Densities | str:
    from difftune.objectives import build_objective
    from difftune.process import build_process
    from difftune.schedules.data_driven import DataSchedule

    oc = run.config.objective
    fit = None
    if oc.fitted_schedules:
        path = run.path / DATA_SCHEDULE_FILE
        if not path.is_file():
            return f"ψ/ξ not shown: the data_driven schedules' fit ({DATA_SCHEDULE_FILE}) is not in the run folder"
        fit = DataSchedule.load(path)
    process = build_process(schedule, _sample_shape(folder), run.config.model.pretraining_density)
    # the streams' schedules are the same for every objective kind; diff_tuning builds them without a
    # model (a distillation objective would build its teacher), and the variance term is not drawn
    objective = build_objective(
        replace(oc, kind="diff_tuning"), process, SimpleNamespace(learns_variance=False), fit
    )
    target, bank = objective.schedules
    return Densities(
        process=process.name,
        target=target.weights().tolist(),
        bank=bank.weights().tolist(),
        target_name=target.name,
        bank_name=bank.name,
        bank_used=oc.bank_share > 0,
        source=str(folder / SCHEDULER_FILE),
    )
