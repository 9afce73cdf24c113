"""The files of a checkpoint that difftune writes itself, beside accelerate's state: the loop's and the
EMA's state, a data-driven schedule, the model folder (with its ``ema/``) and the run's config.

The main process writes them from the live model: first the model itself, then, with an EMA, the
model with the averages swapped in (its ``ema/`` folder and the EMA's state). Under FSDP the whole
tensors are gathered into the main process from the shards for each of the two
(:func:`~difftune.training.sharding.whole_parameters`), so it holds one whole copy of the model at a
time, not the model and its EMA at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from difftune.backbones.loading import LoadedModel
from difftune.backbones.saving import ema_weights, save_model, save_weights
from difftune.config.experiment import ExperimentConfig
from difftune.schedules.data_driven import DataSchedule
from difftune.training.run_dir import DATA_SCHEDULE_FILE
from difftune.training.sharding import is_sharded, whole_parameters
from difftune.training.state import LoopState, save_ema_state, save_run_state
from difftune.tuning import trainable_parameters


def write_checkpoint_files(
    accelerator: Any,
    folder: Path,
    loaded: LoadedModel,
    ema: EMAModel | None,
    trainable: list[torch.nn.Parameter],
    loop: LoopState,
    data_schedule: DataSchedule | None,
    cfg: ExperimentConfig,
) -> None:
    """Write ``folder/state/`` (difftune's part), ``folder/model/`` and ``folder/config.yaml``.

    Call it on every process (under FSDP they all take part in gathering); the main process writes.
    ``trainable``: the run's trainable parameters (the EMA's order; the shards under FSDP).
    """
    main = accelerator.is_main_process
    if not (main or is_sharded(accelerator)):  # only a sharded run's processes all take part
        return
    with whole_parameters(accelerator, loaded.backbone):
        if main:
            save_run_state(folder / "state", loop)
            if data_schedule is not None:
                data_schedule.save(folder / "state" / DATA_SCHEDULE_FILE)
            cfg.save(folder / "config.yaml")
            save_model(loaded, folder / "model")
    if ema is None:
        return
    with ema_weights(ema, trainable), whole_parameters(accelerator, loaded.backbone):
        if main:  # the model holds the (whole) averages now
            save_weights(loaded, folder / "model" / "ema")
            save_ema_state(folder / "state", ema, trainable_parameters(loaded.backbone))
