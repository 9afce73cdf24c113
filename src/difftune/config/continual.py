"""The ``tasks`` list and the ``continual`` section of a task-sequence config (``difftune continual``).

A task-sequence config is an experiment config with two more top-level keys::

    tasks:                      # trained in this order, each stage from the previous stage's final model
      - {name: "2-3", data: {classes: [2, 3]}}
      - {name: "4-5", data: {classes: [4, 5]}, steps: 200}
    continual:
      bank_policy: previous     # pretrained | previous | accumulate
      features: digits:classifier.safetensors

A task's ``data`` is laid over the config's ``data`` section; ``steps`` replaces ``train.max_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from difftune.config.checks import ConfigError, _check, _check_fields
from difftune.config.sampling import SamplingSpec

BankPolicy = Literal["pretrained", "previous", "accumulate"]
TASK_KEYS = ("name", "data", "steps")


@dataclass(frozen=True)
class TaskSpec:
    """One task of a sequence.

    Attributes:
        name: the task's name (folder names, tables); unique in the sequence.
        data: settings laid over the config's ``data`` section (``classes``, ``path``, ...).
        steps: training steps of its stage; ``None``: ``train.max_steps``.
    """

    name: str
    data: dict[str, Any]
    steps: int | None = None


@dataclass
class ContinualSpec:
    """How a task sequence runs and what it measures after every stage (docs/method.md §14).

    Attributes:
        bank_policy: the knowledge bank each stage replays: ``pretrained`` (the original model's bank,
            reused by every stage), ``previous`` (a bank of the previous stage's final model) or
            ``accumulate`` (every stage's ``previous`` bank merged, reservoir-style, under ``bank_cap``;
            each sample records the stage it came from).
        bank_cap: the merged bank's size for ``accumulate``; ``None``: ``bank.num_samples``.
        labels: where a class-conditional model puts each task's classes: ``new`` (the label rows
            after those in use, the table growing as needed: a class-incremental stream) or
            ``shared`` (rows ``0..K-1`` for every task, as a single transfer does: the same classes
            seen again, e.g. one dataset split by time).
        features: the FID feature extractor of the measures after every stage (``inception``,
            ``digits:PATH``, ``module:function``, as ``difftune eval fid --features``); ``None``: no
            measures.
        inception_weights: a local file of the FID Inception's weights (``features: inception``).
        samples_per_class: images generated per class of a task for its FID.
        reference: each task's FID reference: ``held_out`` (its images that the few-shot choice,
            ``data.per_class``, left out of training) or ``training`` (its training images).
        max_reference: at most this many reference images per task (a fixed random choice).
        source_data: the ``data`` settings of the source's reference images (e.g. ``{source: digits,
            classes: [0, 1]}``); ``None``: the original model's bank is the source's reference.
        sampling: how the measured images are drawn (scheduler, steps, guidance, first seed).
        batch_size: images per model call while measuring.
        seed: seed of the bank merges and of the reference choice.
    """

    bank_policy: BankPolicy = "pretrained"
    bank_cap: int | None = None
    labels: Literal["new", "shared"] = "new"
    features: str | None = None
    inception_weights: str | None = None
    samples_per_class: int = 32
    reference: Literal["held_out", "training"] = "held_out"
    max_reference: int = 2000
    source_data: dict[str, Any] | None = None
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _check_fields(self, "continual")
        _check(self.bank_cap is None or self.bank_cap > 0, f"continual.bank_cap={self.bank_cap} must be > 0")
        _check(
            self.samples_per_class >= 1,
            f"continual.samples_per_class={self.samples_per_class} must be >= 1",
        )
        _check(
            self.source_data is None or isinstance(self.source_data, dict),
            f"continual.source_data={self.source_data!r} must be a mapping of data settings, or null",
        )
        _check(self.max_reference >= 2, f"continual.max_reference={self.max_reference} must be >= 2")
        _check(self.batch_size >= 1, f"continual.batch_size={self.batch_size} must be >= 1")
        _check(
            self.inception_weights is None or self.features == "inception",
            "continual.inception_weights only applies to continual.features=inception",
        )
        _check(
            self.bank_cap is None or self.bank_policy == "accumulate",
            f"continual.bank_cap caps the merged bank of bank_policy=accumulate, not {self.bank_policy}: "
            "leave it out or set continual.bank_policy=accumulate",
        )


def tasks_from_list(raw: Any) -> list[TaskSpec]:
    """The ``tasks:`` list of a config as :class:`TaskSpec` s (a task without a name is named by its index).

    Raises:
        ConfigError: not a non-empty list of mappings, an unknown key, a bad ``steps`` or a repeated name.
    """
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            "tasks must be a non-empty list, one mapping per task: - {name: ..., data: {classes: [2, 3]}}"
        )
    tasks = []
    for i, item in enumerate(raw, start=1):
        if not isinstance(item, dict):
            raise ConfigError(f"tasks[{i}] must be a mapping (name, data, steps), got {item!r}")
        unknown = sorted(set(item) - set(TASK_KEYS))
        _check(not unknown, f"tasks[{i}] has unknown key(s) {unknown}; a task takes {list(TASK_KEYS)}")
        data = item.get("data") or {}
        _check(isinstance(data, dict), f"tasks[{i}].data must be a mapping of data settings")
        steps = item.get("steps")
        _check(
            steps is None or (isinstance(steps, int) and not isinstance(steps, bool) and steps > 0),
            f"tasks[{i}].steps={steps!r} must be a positive integer",
        )
        name = str(item.get("name") or f"task{i}")
        _check(
            name.replace("-", "").replace("_", "").replace(".", "").isalnum(),
            f"tasks[{i}].name={name!r} names a folder: use letters, digits, '-', '_' and '.'",
        )
        tasks.append(TaskSpec(name, dict(data), steps))
    names = [task.name for task in tasks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    _check(not repeated, f"task names must be unique; repeated: {repeated}")
    return tasks
