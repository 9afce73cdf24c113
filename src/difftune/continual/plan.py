"""A task sequence's plan: its config read and checked, and the experiment config of each stage.

The sequence folder (``train.output_dir``) holds one run folder per stage, ``stage<k>-<task>/``, a
regular training run (resumable, reportable), the banks in ``banks/``, the grown start models in
``starts/``, ``sequence.json`` (the plan's fingerprint and the stages done) and ``measures.json``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftune.config.checks import ConfigError, _check
from difftune.config.continual import ContinualSpec, TaskSpec, tasks_from_list
from difftune.config.data import DataConfig
from difftune.config.experiment import ExperimentConfig, config_from_mapping
from difftune.config.files import parse_value, read_config_file
from difftune.config.sections import build_section, set_nested

_NO_BANK = "<the sequence's own bank>"
SEQUENCE_KEYS = (
    "bank_policy",
    "bank_cap",
    "labels",
    "seed",
)  # the continual settings the weights depend on  # bank.path while the config leaves it to the sequence


@dataclass(frozen=True)
class StartModel:
    """The model a stage starts from: a directory and its weights' subfolder (``ema/transformer``...)."""

    path: str
    subfolder: str | None


@dataclass
class SequencePlan:
    """A task sequence read from its config.

    Attributes:
        base: the experiment config every stage starts from (its ``data`` under each task's).
        tasks: the tasks, in order.
        spec: the ``continual`` section.
        own_bank: the original model's bank given as ``bank.path`` (``pretrained`` policy), or ``None``:
            the sequence makes it.
    """

    base: ExperimentConfig
    tasks: list[TaskSpec]
    spec: ContinualSpec
    own_bank: str | None

    @property
    def out(self) -> Path:
        """The sequence folder."""
        return Path(self.base.train.output_dir)

    def load(self, model: StartModel) -> Any:
        """A model of the sequence (``LoadedModel``), with the configured VAE and revision."""
        from difftune.backbones.loading import load_pretrained

        return load_pretrained(model.path, model.subfolder, self.base.model.vae, self.base.model.revision)

    def record(self) -> dict[str, Any]:
        """What the stages' weights depend on, as ``sequence.json`` keeps it (:meth:`changes_from`)."""
        return {
            "config": self.base.to_dict(),
            "task_settings": [dataclasses.asdict(task) for task in self.tasks],
            "continual": {key: getattr(self.spec, key) for key in SEQUENCE_KEYS},
        }

    def changes_from(self, saved: dict[str, Any]) -> list[str]:
        """How this plan differs from the ``record`` of the sequence in its folder, as ``key: old -> new``;
        settings that resuming a run allows (:func:`~difftune.training.run_dir.config_changes`) and
        settings added to difftune since (at their defaults) are not differences."""
        from difftune.config.renames import upgrade
        from difftune.training.run_dir import config_changes

        changes = config_changes(upgrade(saved.get("config") or {}, warn=False), self.base.to_dict())[1]
        now = self.record()
        tasks = saved.get("task_settings")
        if tasks is None:  # a record of the first layout: the task names only
            names = [task.name for task in self.tasks]
            changes += [f"tasks: {saved.get('tasks')} -> {names}"] if saved.get("tasks") != names else []
        elif tasks != now["task_settings"]:
            changes.append(f"tasks: {tasks} -> {now['task_settings']}")
        for key, value in (saved.get("continual") or {}).items():
            if now["continual"].get(key, value) != value:
                changes.append(f"continual.{key}: {value!r} -> {now['continual'][key]!r}")
        return changes

    def stage_dir(self, k: int) -> Path:
        """The run folder of stage ``k`` (1-based)."""
        return self.out / f"stage{k}-{self.tasks[k - 1].name}"

    def task_data(self, k: int, label_offset: int = 0, label_names: list[str] | None = None) -> DataConfig:
        """The ``data`` section of task ``k`` (1-based): the config's, with the task's settings over it,
        its classes on the rows from ``label_offset`` (those below named ``label_names``)."""
        base = dataclasses.asdict(self.base.data)
        merged = {**base, **self.tasks[k - 1].data, "label_offset": label_offset, "label_names": label_names}
        if self.base.data.cache_dir:  # one target cache per stage: each task is other data
            merged["cache_dir"] = str(Path(self.base.data.cache_dir) / self.stage_dir(k).name)
        return build_section(DataConfig, merged, f"tasks[{k}].data")[0]

    def stage_config(
        self, k: int, start: StartModel, label_names: list[str], bank: str | None, resume: bool
    ) -> ExperimentConfig:
        """The experiment config of stage ``k``: its task's data on the rows after ``label_names`` (the
        names of the rows before them), from ``start``, replaying ``bank`` (a bank of an earlier model),
        into its run folder, resuming when asked."""
        cfg, task = self.base, self.tasks[k - 1]
        model = dataclasses.replace(cfg.model, pretrained=start.path, subfolder=start.subfolder)
        bank_cfg = dataclasses.replace(cfg.bank, path=bank or "", made_by="earlier_model")
        train = dataclasses.replace(
            cfg.train,
            output_dir=str(self.stage_dir(k)),
            max_steps=task.steps or cfg.train.max_steps,
            resume="latest" if resume else None,
        )
        unset = cfg.unset - {"train.max_steps"} if task.steps else cfg.unset
        return ExperimentConfig(
            model,
            self.task_data(k, len(label_names), label_names or None),
            bank_cfg,
            cfg.objective,
            train,
            cfg.tuning,
            unset=unset,
        )


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """The ``continual.*`` overrides and the others (the experiment config's)."""
    own = [item for item in overrides if item.split("=", 1)[0].strip().startswith("continual.")]
    return own, [item for item in overrides if item not in own]


def load_sequence(path: str | os.PathLike, overrides: list[str] | None = None) -> SequencePlan:
    """Read a task-sequence config (an experiment config with ``tasks:`` and ``continual:``) and check
    every stage's data settings.

    Raises:
        ConfigError: no ``tasks``, a bad task or ``continual`` setting, a tuning method other than
            ``full``, or a bank policy that the objective does not read.
    """
    raw = read_config_file(path)
    if "tasks" not in raw:
        raise ConfigError(
            f"config file {str(path)!r} lists no tasks: add tasks: (one mapping per task), or train it "
            "with `difftune train`"
        )
    tasks = tasks_from_list(raw.pop("tasks"))
    continual_raw = raw.pop("continual", None) or {}
    _check(isinstance(continual_raw, dict), "continual must be a mapping of key: value")
    own, others = _split_overrides(overrides or [])
    for item in own:
        key, _, value = item.partition("=")
        set_nested(continual_raw, key.strip().split(".")[1:], parse_value(value))
    spec = build_section(ContinualSpec, continual_raw, "continual")[0]

    sections = {name: dict(value or {}) for name, value in raw.items()}
    if not sections.setdefault("data", {}).get("path") and all(task.data.get("path") for task in tasks):
        sections["data"]["path"] = "<each task's data.path>"  # never read: every task gives its own
    sections.setdefault("bank", {}).setdefault("path", "")
    if not sections["bank"]["path"]:
        sections["bank"]["path"] = _NO_BANK
    base = config_from_mapping(sections, others)
    own_bank = None if base.bank.path == _NO_BANK else base.bank.path
    _check(
        base.tuning.method == "full",
        f"a task sequence starts each stage from the previous stage's whole model; tuning.method="
        f"{base.tuning.method} saves an adapter only: use tuning.method=full",
    )
    _check(
        own_bank is None or spec.bank_policy == "pretrained",
        f"bank.path gives the original model's bank, which only bank_policy=pretrained replays; remove "
        f"bank.path (continual.bank_policy={spec.bank_policy} makes its own banks)",
    )
    _check(
        base.reads_bank or spec.bank_policy == "pretrained",
        f"continual.bank_policy={spec.bank_policy} makes banks, but this objective replays none "
        "(objective.bank_share=0): leave the policy at pretrained",
    )
    _check(
        not base.stores_teacher,
        "objective.distillation.teacher=stored is not supported in a task sequence (each stage's teacher is "
        "its own start model, which the banks do not store): use objective.distillation.teacher=copy",
    )
    plan = SequencePlan(base, tasks, spec, own_bank)
    for k in range(1, len(tasks) + 1):
        plan.task_data(k)  # every task's data settings checked now, not stages later
    return plan
