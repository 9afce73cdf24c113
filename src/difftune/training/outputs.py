"""What a training run writes besides checkpoints: its metrics history, sample grids, and (for a
ControlNet) the condition-fidelity check it runs at validation steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import imports as accelerate_imports

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.loading import LoadedModel
from difftune.backbones.saving import save_model, save_pipeline_index
from difftune.config.experiment import ExperimentConfig
from difftune.config.sampling import SamplingSpec
from difftune.config.sections import flatten
from difftune.control.validation import FidelityValidation, check_validation, validation_pairs
from difftune.errors import UserError
from difftune.io.atomic import atomic_directory, atomic_write_json
from difftune.io.images import save_grid
from difftune.sampling.generate import to_unit_range
from difftune.sampling.shares import generate_shared
from difftune.training.run_dir import HISTORY

BEST_FILE = "best.json"  # in best/: the metric, its score and the step


def append_history(out: Path, step: int, scalars: dict[str, float]) -> None:
    """Append the logged scalars to ``<out>/metrics.jsonl`` (one JSON object per log)."""
    with open(out / HISTORY, "a") as f:
        f.write(json.dumps({"step": step, **scalars}) + "\n")


def tracker(report_to: str) -> str | None:
    """accelerate's ``log_with`` for ``train.report_to`` (``None`` for ``none``).

    Raises:
        UserError: the tracker's package is not installed (accelerate would drop it with a warning).
    """
    if report_to == "none":
        return None
    if not bool(getattr(accelerate_imports, f"is_{report_to}_available")()):
        raise UserError(
            f"train.report_to={report_to}: the {report_to} package is not installed; pip install {report_to}, "
            "or use train.report_to=tensorboard (or none)"
        )
    return report_to


def flat_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Config flattened to scalars for TensorBoard's hyper-parameter table, one per dotted key
    (``objective.distillation.teacher_dtype``); a list or ``None`` is written as text."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) else str(value)
        for key, value in flatten(cfg.to_dict()).items()
    }


@torch.no_grad()
def save_sample_grid(
    backbone: Backbone,
    loaded: LoadedModel,
    target_cond: Conditioning,
    spec: SamplingSpec,
    path: Path,
    device: torch.device | str,
    per_class: int = 8,
    shared: Any | None = None,
) -> None:
    """A grid of samples of ``backbone``, fixed seeds: one row per condition its family picks from the
    target's (one per class label; for text conditions, every image its own, 8 spread over the set).

    ``shared``: the accelerator of a sharded run, whose processes share the work; call it on every
    process then (a sharded model's forward pass needs all of them): each generates its share of the
    images (:func:`~difftune.sampling.shares.generate_shared`; image ``i`` keeps seed ``spec.seed + i``, so the grid is a
    one-process run's), and the main process gathers and writes them.
    """
    was_training = backbone.training
    backbone.eval()
    rows = loaded.family.grid_conditions(target_cond)
    cond = rows.select(torch.arange(rows.batch_size).repeat_interleave(per_class))

    def decode(x: torch.Tensor) -> torch.Tensor:
        return to_unit_range(loaded.codec.decode(x))

    images = generate_shared(backbone, loaded.scheduler_config, spec, cond, decode, device, shared)
    if shared is None or shared.is_main_process:
        save_grid(images.cpu(), path, nrow=per_class, upscale=max(1, 64 // images.shape[-1]))
    backbone.train(was_training)


def fidelity_validation(
    cfg: ExperimentConfig, loaded: LoadedModel, target_cond: Conditioning, out: Path
) -> FidelityValidation | None:
    """The condition-fidelity check of a ControlNet run (``train.validation_every``), or None."""
    tc, backbone = cfg.train, loaded.backbone
    check_validation(tc.validation_every, backbone, cfg.data.annotator)
    if not tc.validation_every:
        return None
    from difftune.control import build_annotator

    pairs = validation_pairs(target_cond, tc.validation_samples)
    if tc.validation_prompts == "empty":
        pairs = backbone.drop(pairs, torch.ones(pairs.batch_size, dtype=torch.bool))
    return FidelityValidation(
        pairs,
        build_annotator(cfg.data.annotator),
        loaded.codec,
        loaded.scheduler_config,
        tc.sampling,
        out,
        tc.validation_edge_tolerance,
    )


def write_final(
    final: Path, checkpoint: Path, loaded: LoadedModel, class_names: list[str], cfg: ExperimentConfig
) -> None:
    """Write ``final/``: the model of ``checkpoint``, its pipeline index and the run's config, all at
    once (a crash never leaves a half-written ``final/``)."""
    with atomic_directory(final) as staging:
        shutil.copytree(checkpoint / "model", staging, dirs_exist_ok=True)
        _describe(staging, loaded, class_names, cfg)


def write_best(
    best: Path, loaded: LoadedModel, class_names: list[str], cfg: ExperimentConfig, record: dict[str, Any]
) -> None:
    """Write ``best/`` as ``final/`` is written, from the live model: its weights in place (the caller
    has put the EMA's averages there, so they are what loads by default), and ``best.json``
    (``record``: the metric, its score and the step)."""
    with atomic_directory(best) as staging:
        save_model(loaded, staging)
        _describe(staging, loaded, class_names, cfg)
        atomic_write_json(staging / BEST_FILE, record)


def _describe(folder: Path, loaded: LoadedModel, class_names: list[str], cfg: ExperimentConfig) -> None:
    """What makes a saved model folder a run's output: its pipeline index and the run's config."""
    save_pipeline_index(loaded, folder, class_names)
    cfg.save(folder / "config.yaml")
