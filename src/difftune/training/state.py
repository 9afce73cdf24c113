"""What a run directory holds for resuming, written and read without unpickling anything.

A checkpoint's ``state/`` folder holds accelerate's part (model weights as safetensors, the
optimizer and the RNG states, which accelerate reads with ``torch.load(weights_only=True)``; under
FSDP the model and optimizer as one shard per process in ``pytorch_model_fsdp_0/`` and
``optimizer_0/``) and difftune's part, written here:

* ``difftune_loop.json``: the step and the positions of the data streams (:class:`LoopState`);
* ``difftune_ema.safetensors`` + ``difftune_ema.json``: the EMA's averages and its settings.

accelerate's own mechanism for such objects (``register_for_checkpointing``) pickles them and
unpickles them with ``weights_only=False``, which runs any code planted in the file. Checkpoints
written before this module existed hold ``custom_checkpoint_<i>.pkl`` files; they are read with
``weights_only=True``, which accepts their tensors and numbers and refuses anything else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import save_file

from difftune.errors import UserError
from difftune.io.atomic import atomic_path, atomic_write_json
from difftune.io.store import safetensors_problem
from difftune.training.model_state import sharded_trainable_only
from difftune.training.sharding import copy_into, is_sharded
from difftune.training.streams import BucketStreams, IndexStream

CHECKPOINTS = "checkpoints"
logger = logging.getLogger(__name__)
LOOP_FILE = "difftune_loop.json"
EMA_FILE = "difftune_ema.safetensors"
EMA_SETTINGS_FILE = "difftune_ema.json"
SHARDED_MODEL, SHARDED_OPTIMIZER = "pytorch_model_fsdp_0", "optimizer_0"  # accelerate's names under FSDP


@dataclass
class LoopState:
    """What the loop itself must resume: the step and the positions of the data streams."""

    step: int = 0
    target: IndexStream | BucketStreams | None = None
    bank: IndexStream | BucketStreams | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "target": self.target.state_dict() if self.target else None,
            "bank": self.bank.state_dict() if self.bank else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        for name in ("target", "bank"):
            stream = getattr(self, name)
            if (stream is None) != (state[name] is None):
                raise UserError(f"checkpoint and config disagree on whether a {name} stream exists")
            if stream is not None:
                stream.load_state_dict(state[name])


def checkpoint_step(checkpoint: Path) -> int:
    """The step of ``checkpoints/checkpoint-<step>``."""
    return int(checkpoint.name.split("-")[1])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Completed checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=checkpoint_step)


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``"latest"`` (the newest undamaged one; None if there is none yet),
    a path, or None.

    Raises:
        UserError: the path is not a checkpoint, or is damaged (:func:`checkpoint_problem`).
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        problems = []
        for checkpoint in reversed(found):  # newest first; a damaged one is passed over
            problems.append(checkpoint_problem(checkpoint))
            if problems[-1] is None:
                return checkpoint
            logger.warning("not resuming from %s: %s; trying the one before", checkpoint, problems[-1])
        if found:
            raise UserError(
                f"every checkpoint in {Path(output_dir) / CHECKPOINTS} is damaged (the newest, {found[-1].name}: "
                f"{problems[0]}); start the run again with train.overwrite=true, or restore a checkpoint "
                "from a copy"
            )
        return None
    path = Path(resume)
    if not (path / "state").is_dir():
        raise UserError(
            f"train.resume={resume!r} is not a difftune checkpoint (no state/ folder in it); give a "
            "<output_dir>/checkpoints/checkpoint-N folder, or train.resume=latest"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(
            f"train.resume={resume!r} cannot be resumed from: {problem}; give an older checkpoint, or "
            "train.resume=latest (which passes over damaged ones)"
        )
    return path


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (a missing, cut-short or unreadable file), or ``None``.

    Every file of the checkpoint that resuming reads (``state/``, ``config.yaml``, and ``model/``,
    which ``final/`` is copied from) is checked by its kind (:func:`_check_file`), cheaply: no tensor
    is read and nothing is unpickled.
    """
    state = checkpoint / "state"
    missing = [p.name for p in _required_files(state) if not p.is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            _check_file(path)
        except (OSError, ValueError, zipfile.BadZipFile, yaml.YAMLError) as err:
            return f"{path.relative_to(checkpoint)} is damaged ({type(err).__name__}: {err})"
    return None


def _required_files(state: Path) -> list[Path]:
    """The files of a checkpoint's ``state/`` that resuming cannot do without."""
    if (state / SHARDED_MODEL).is_dir():  # FSDP: accelerate's torch.distributed.checkpoint folders
        required = [state / SHARDED_MODEL / ".metadata", state / SHARDED_OPTIMIZER / ".metadata"]
    else:
        required = [state / "model.safetensors", state / "optimizer.bin"]
    required.append(state / "random_states_0.pkl")
    if not _legacy_files(state):
        required.append(state / LOOP_FILE)
    ema = [state / EMA_FILE, state / EMA_SETTINGS_FILE]
    if any(p.exists() for p in ema):  # a run with an EMA writes both
        required += ema
    return required


def _check_file(path: Path) -> None:
    """Raise if ``path`` is cut short or unreadable, judged by its kind; other kinds are not read.

    safetensors: the header, which safetensors checks against the file's size; torch's files
    (accelerate's optimizer, RNG, scheduler and scaler states, old-format pickles): a zip archive
    whose directory, written last, is whole; JSON and YAML: they parse (YAML to a mapping).
    """
    if path.suffix == ".safetensors":
        problem = safetensors_problem(path)
        if problem is not None:
            raise ValueError(problem)
    elif path.suffix in (".bin", ".pkl", ".pt"):
        with zipfile.ZipFile(path):
            pass
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".yaml" and not isinstance(yaml.safe_load(path.read_text()), dict):
        raise ValueError("not a mapping of settings")


def save_run_state(state_dir: Path, loop: LoopState) -> None:
    """Write the loop's part of a checkpoint's ``state/`` folder (the EMA's: :func:`save_ema_state`)."""
    atomic_write_json(state_dir / LOOP_FILE, loop.state_dict())


def save_ema_state(state_dir: Path, ema: EMAModel, averages: list[torch.Tensor]) -> None:
    """Write the EMA's part of a checkpoint's ``state/`` folder: its settings (step, decay...) and
    ``averages``, its averages as whole tensors (its own, or gathered from a sharded run's shards)."""
    settings = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    tensors = {f"{i:06d}": p.detach().cpu().contiguous() for i, p in enumerate(averages)}
    with atomic_path(state_dir / EMA_FILE) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(state_dir / EMA_SETTINGS_FILE, settings)


def restore_checkpoint(
    accelerator: Any,
    checkpoint: Path,
    loop: LoopState,
    ema: EMAModel | None,
    model: torch.nn.Module | None = None,
) -> None:
    """Restore a whole run from ``checkpoint``: accelerate's state, then the loop's and the EMA's.
    ``model`` (the module given to ``accelerator.prepare``): under FSDP, only its trainable shards are
    read (:func:`~difftune.training.model_state.sharded_trainable_only`).

    Raises:
        UserError: a state file holds more than tensors and numbers (it could run code), or is damaged.
    """
    state_dir = checkpoint / "state"
    written_sharded = (state_dir / SHARDED_MODEL).is_dir()
    if written_sharded != is_sharded(accelerator):
        kind = "a sharded (FSDP) launch" if written_sharded else "a launch without sharding"
        fix = (
            "configs/accelerate/fsdp2.yaml" if written_sharded else "a data-parallel launch (no FSDP config)"
        )
        raise UserError(
            f"{checkpoint} was written by {kind}, and this launch {'does not shard' if written_sharded else 'shards'}: "
            f"its model and optimizer state cannot be read here; resume it with {fix}"
        )
    legacy = _legacy_files(state_dir)
    with tempfile.TemporaryDirectory(prefix="difftune-state-") as view:
        source = state_dir
        if legacy:  # accelerate refuses custom_checkpoint files it did not register: show it the rest only
            source = Path(view)
            for entry in state_dir.iterdir():
                if entry not in legacy:
                    (source / entry.name).symlink_to(entry.resolve())
        try:
            with contextlib.nullcontext() if model is None else sharded_trainable_only(accelerator, model):
                accelerator.load_state(str(source))
        except pickle.UnpicklingError:
            raise UserError(
                f"{state_dir} holds a file with objects other than tensors and numbers; it was not loaded, as "
                "unpickling it could run code; resume from a checkpoint you wrote yourself"
            ) from None
    load_run_state(state_dir, loop, ema)
    if ema is not None:
        ema.to(accelerator.device)


def load_run_state(state_dir: Path, loop: LoopState, ema: EMAModel | None) -> None:
    """Restore ``loop`` and ``ema`` from a checkpoint's ``state/`` folder, unpickling nothing.

    Raises:
        UserError: the files are missing, damaged, or (old format) hold more than tensors and numbers.
    """
    if (state_dir / LOOP_FILE).is_file():
        try:
            loop.load_state_dict(json.loads((state_dir / LOOP_FILE).read_text()))
            if ema is not None:
                ema.load_state_dict(json.loads((state_dir / EMA_SETTINGS_FILE).read_text()))
                load_ema_in_place(ema, state_dir / EMA_FILE)
        except (OSError, ValueError, KeyError) as err:
            if isinstance(err, UserError):
                raise
            raise UserError(
                f"{state_dir} is damaged ({type(err).__name__}: {err}); resume from another checkpoint"
            ) from None
        return
    legacy = _legacy_files(state_dir)
    if not legacy:
        raise UserError(
            f"{state_dir} holds no difftune loop state ({LOOP_FILE}); it is not a difftune checkpoint"
        )
    objects = [obj for obj in (ema, loop) if obj is not None]  # the order the old code registered them in
    if len(legacy) != len(objects):
        raise UserError(
            f"{state_dir} holds {len(legacy)} saved objects, this run expects {len(objects)} "
            "(EMA on in one and off in the other?); resume with the same train.ema_decay"
        )
    for obj, path in zip(objects, legacy, strict=True):
        obj.load_state_dict(_load_tensors_only(path))


def load_ema_in_place(ema: EMAModel, path: Path) -> None:
    """Copy the averages of ``path`` into ``ema``'s own tensors (or their shards, under FSDP), one at a
    time: diffusers' ``EMAModel.load_state_dict`` deep-copies its argument, which holds a model's size
    twice more.

    Raises:
        UserError: the file holds another number of averages, or one of another shape.
    """
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = sorted(f.keys())
        if len(keys) != len(ema.shadow_params):
            raise UserError(
                f"{path} holds {len(keys)} averages, this run's EMA {len(ema.shadow_params)}: the checkpoint "
                "was written with other trainable parameters; resume with the run's own tuning settings"
            )
        with torch.no_grad():
            for key, average in zip(keys, ema.shadow_params, strict=True):
                value = f.get_tensor(key)
                if value.shape != average.shape:
                    raise UserError(
                        f"{path}: average {key} has shape {tuple(value.shape)}, the EMA's {tuple(average.shape)}"
                    )
                copy_into(average, value)


def _legacy_files(state_dir: Path) -> list[Path]:
    """The pickled custom objects of an old-format checkpoint, in the order they were registered."""
    found = state_dir.glob("custom_checkpoint_*.pkl")
    return sorted(
        found, key=lambda p: int(p.stem.rsplit("_", 1)[1]) if p.stem.rsplit("_", 1)[1].isdigit() else -1
    )


def _load_tensors_only(path: Path) -> dict[str, Any]:
    """An old-format pickle, read with ``weights_only=True``: tensors, numbers and containers only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{path} holds objects other than tensors and numbers; it was not loaded, as unpickling it could "
            "run code; resume from a checkpoint you wrote yourself"
        ) from None
