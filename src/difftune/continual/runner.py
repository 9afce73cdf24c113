"""Run a task sequence: stage after stage, each a regular training run, with the measures between.

Stage ``k`` starts from the final model (its EMA weights) of stage ``k - 1`` (stage 1: the
configured model). Its task's classes take the label rows after those in use (``continual.labels:
new``) or rows ``0..K-1`` (``shared``); the label table grows when it is too small (:mod:`difftune.backbones.label_table`), into ``starts/stage<k>``. Its
bank follows ``continual.bank_policy`` (:mod:`difftune.continual.banks`). Running the command
again resumes: finished stages (``final/`` written) are kept, an interrupted stage resumes from its
latest checkpoint (exactly, as ``train.resume=latest`` does), and measures already taken are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difftune.backbones.base import ClassConditionalBackbone
from difftune.backbones.label_table import grow_label_table
from difftune.backbones.loading import LoadedModel
from difftune.backbones.saving import save_model
from difftune.continual.banks import banks_needed, make_model_bank, model_bank_dir, stage_bank
from difftune.continual.heatmap import write_heat_map
from difftune.continual.measures import MEASURES, ScoreMatrix
from difftune.continual.plan import SequencePlan, StartModel
from difftune.continual.scoring import TaskClasses, TaskScorer, reference_images, source_reference
from difftune.data.targets import load_target_images
from difftune.errors import UserError
from difftune.io.atomic import atomic_write_json
from difftune.io.store import LatentStore
from difftune.training.state import list_checkpoints

SEQUENCE_FILE = "sequence.json"
HEAT_MAP = "heatmap.png"
OWN_PATHS = ("banks", "starts", SEQUENCE_FILE, MEASURES, HEAT_MAP)  # besides the stage folders


def final_model(run_dir: Path) -> StartModel:
    """The model a finished stage hands on: ``final/``, its EMA weights when it has them."""
    final = run_dir / "final"
    ema = final / "ema"
    sub = next((f"ema/{p.name}" for p in sorted(ema.iterdir()) if p.is_dir()), None) if ema.is_dir() else None
    return StartModel(str(final), sub)


def class_names(plan: SequencePlan, k: int) -> list[str]:
    """The class names of task ``k`` (1-based), read from its data without decoding images."""
    return load_target_images(plan.task_data(k), 8, 1).class_names


def source_names(model: StartModel, rows: int) -> list[str]:
    """The names of the source's label rows: its ``class_names.json`` (a difftune model), else ``label<i>``."""
    path = Path(model.path) / "class_names.json"
    names = json.loads(path.read_text()) if path.is_file() else []
    if not (isinstance(names, list) and len(names) == rows and all(isinstance(n, str) for n in names)):
        names = [f"label{row}" for row in range(rows)]
    return names


def claim_folder(plan: SequencePlan, overwrite: bool) -> None:
    """Make the sequence folder ours: refuse one that holds another plan's stages (or, with
    ``overwrite``, clear them), and record this plan in ``sequence.json``.

    Raises:
        UserError: the folder holds another sequence, or a training run of its own.
    """
    out, record = plan.out, plan.out / SEQUENCE_FILE
    if record.is_file():
        changes = plan.changes_from(json.loads(record.read_text()))
        if changes and not overwrite:
            raise UserError(
                f"{out} holds a task sequence with other settings ({'; '.join(changes[:3])}"
                f"{'; ...' if len(changes) > 3 else ''}); choose another train.output_dir, or pass --overwrite "
                "to replace it"
            )
        if changes:
            for path in [*out.glob("stage*-*"), *(out / name for name in OWN_PATHS)]:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
    elif (out / "config.yaml").is_file() or list_checkpoints(out):
        raise UserError(
            f"{out} holds a training run, not a task sequence; choose another train.output_dir for the sequence"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"tasks": [task.name for task in plan.tasks], **plan.record()})


def check_own_bank(path: str, source: LoadedModel) -> None:
    """The bank given as ``bank.path`` is the configured model's (the stages, trained from later models,
    no longer check it against their own weights).

    Raises:
        UserError: it is missing, or another model made it.
    """
    store = LatentStore(path)
    if not (store.root / "manifest.json").is_file():
        raise UserError(
            f"bank.path {path!r} holds no bank: make it with `difftune bank`, or leave bank.path out"
        )
    made_by = store.manifest["source_fingerprint"]
    if made_by != source.fingerprint():
        raise UserError(
            f"bank.path {path!r} was made by another model (fingerprint {made_by}, the configured model is "
            f"{source.fingerprint()}); leave bank.path out and the sequence makes the original model's bank"
        )


def start_model(plan: SequencePlan, k: int, previous: StartModel, rows: int) -> StartModel:
    """``previous`` with its label table grown to ``rows`` class rows, written to ``starts/stage<k>``
    (kept from an earlier call): the model stage ``k`` starts from when its classes need new rows."""
    grown = plan.out / "starts" / f"stage{k}"
    if not grown.is_dir():
        loaded = plan.load(previous)
        grow_label_table(loaded.backbone.inner, rows)
        save_model(loaded, grown)
    return StartModel(str(grown), None)


class Measures:
    """The measures of a sequence: its score matrix, filled as stages finish and kept on resuming."""

    def __init__(
        self, plan: SequencePlan, source: LoadedModel, source_start: StartModel, device: torch.device | str
    ) -> None:
        from difftune.metrics.extractors import build_extractor

        if not isinstance(source.backbone, ClassConditionalBackbone):
            raise UserError(
                "continual.features: the measures after each stage score class-conditional models; leave "
                "continual.features unset for this model (each stage's own train.evaluation still runs)"
            )
        spec = plan.spec
        assert spec.features is not None
        self.plan, self.source_start = plan, source_start
        self.scorer = TaskScorer(plan, build_extractor(spec.features, spec.inception_weights), device)
        shape = source.backbone.sample_shape
        self.resolution, self.channels = source.codec.image_size(shape), source.codec.image_channels(shape)
        names = ["source"] + [task.name for task in plan.tasks]
        path = plan.out / MEASURES
        self.matrix = (
            ScoreMatrix.read(path)
            if path.is_file()
            else ScoreMatrix(names, [], [], [], [None] * len(names), [None] * len(names))
        )
        if self.matrix.tasks != names:
            raise UserError(f"{path} scores other tasks ({self.matrix.tasks}); delete it to measure again")
        self._reference(0, source)  # the one use of the source's weights: it is not kept
        if not self.matrix.stages:
            self._append_row(source, [TaskClasses(0, source.backbone.num_classes)], None)

    def _reference(self, task: int, source: LoadedModel | None = None) -> None:
        """Compute task ``task``'s reference once (the source's, task 0, decodes with ``source``)."""
        if self.scorer.has_reference(task):
            return
        if task == 0:
            assert source is not None
            bank = (
                str(model_bank_dir(self.plan, 0))
                if (model_bank_dir(self.plan, 0) / "manifest.json").is_file()
                else None
            )
            images = source_reference(self.plan, source, self.resolution, self.channels, bank)
        else:
            images = reference_images(self.plan, self.plan.task_data(task), self.resolution, self.channels)
        self.scorer.add_reference(task, images)

    def score(self, loaded: LoadedModel, task: int, classes: TaskClasses) -> float:
        """FID of ``loaded`` on task ``task``."""
        self._reference(task)
        return self.scorer.score(loaded, task, classes)

    def before(self, k: int, start: StartModel, classes: TaskClasses) -> None:
        """Score task ``k`` with the model that starts stage ``k`` and with the source grown alike."""
        if self.matrix.before[k] is not None:
            return
        self.matrix.before[k] = self.score(self.plan.load(start), k, classes)
        baseline = self._grown_source(classes.first_row + classes.count)
        self.matrix.baseline[k] = self.score(baseline, k, classes)
        self.save()

    def row(self, i: int, model: StartModel, tasks: list[TaskClasses], stage_dir: str) -> None:
        """Row ``i`` >= 1: ``model`` (the model after stage ``i``) on the source and tasks ``1..i``
        (``tasks[j]``), unless it is measured already."""
        if len(self.matrix.stages) <= i:
            self._append_row(self.plan.load(model), tasks[: i + 1], stage_dir)

    def _append_row(self, loaded: LoadedModel, tasks: list[TaskClasses], stage_dir: str | None) -> None:
        i, width = len(self.matrix.stages), len(self.matrix.tasks)
        scores: list[float | None] = [self.score(loaded, j, tasks[j]) for j in range(i + 1)]
        self.matrix.scores.append(scores + [None] * (width - i - 1))
        self.matrix.stages.append(self.matrix.tasks[i])
        self.matrix.stage_dirs.append(stage_dir)
        self.save()

    def _grown_source(self, rows: int) -> LoadedModel:
        """The source model loaded again, its label table grown to ``rows`` class rows."""
        copy = self.plan.load(self.source_start)
        if copy.backbone.num_classes < rows:
            grow_label_table(copy.backbone.inner, rows)
            copy.backbone.num_classes = rows
        return copy

    def save(self) -> None:
        """Write ``measures.json`` and the heat map."""
        self.matrix.write(self.plan.out / MEASURES)
        if self.matrix.stages:
            write_heat_map(self.matrix, self.plan.out / HEAT_MAP)


def run_sequence(plan: SequencePlan, overwrite: bool = False, progress: bool = True) -> Path:
    """Train every stage of ``plan`` (resuming what an earlier call left), measuring after each;
    return the sequence folder. Under ``accelerate launch`` every process trains and makes banks;
    the main process alone writes the sequence's own files and measures."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from difftune.training.loop import train_model

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    main = state.is_main_process
    if main:
        claim_folder(plan, overwrite)
    state.wait_for_everyone()
    base = plan.base.model
    models = [StartModel(base.pretrained, base.subfolder)]
    source = plan.load(models[0])
    if plan.own_bank and plan.base.reads_bank:
        check_own_bank(plan.own_bank, source)
    class_conditional = isinstance(source.backbone, ClassConditionalBackbone)
    rows = source.backbone.num_classes if class_conditional else 0
    tasks = [TaskClasses(0, rows)]
    names = source_names(models[0], rows)  # one per label row in use
    if plan.spec.features and (plan.base.reads_bank or plan.spec.source_data is None):
        make_model_bank(plan, 0, models[0], progress)  # also the source's reference without source_data
    measures = Measures(plan, source, models[0], state.device) if plan.spec.features and main else None
    del source  # not held through the stages: a real-size model would sit beside each stage's own
    for k in tqdm(range(1, len(plan.tasks) + 1), desc="stages", disable=not (progress and main)):
        run_dir = plan.stage_dir(k)
        new_names = class_names(plan, k) if class_conditional else []
        count = len(new_names)
        first = rows if plan.spec.labels == "new" else 0
        tasks.append(TaskClasses(first, count))
        for j in banks_needed(plan, k) if plan.base.reads_bank else []:
            make_model_bank(plan, j, models[j], progress)
        start = models[k - 1]
        if first + count > rows:
            if main:
                start_model(plan, k, start, first + count)
            state.wait_for_everyone()
            start = StartModel(str(plan.out / "starts" / f"stage{k}"), None)
        bank = stage_bank(plan, k) if main else None
        state.wait_for_everyone()
        bank = bank or stage_bank(plan, k)  # the merged bank the main process wrote, found again
        if measures is not None:
            measures.before(k, start, tasks[k])
        if not (run_dir / "final").is_dir():
            resume = bool(list_checkpoints(run_dir))
            train_model(plan.stage_config(k, start, names[:first], bank, resume))
        models.append(final_model(run_dir))
        rows = max(rows, first + count)
        names = names[:first] + new_names + names[first + count :]
        if measures is not None:
            measures.row(k, models[-1], tasks, run_dir.name)
        state.wait_for_everyone()
    return plan.out


def describe(plan: SequencePlan) -> list[str]:
    """The dry run's lines: each stage's task, steps, bank and folder."""
    lines = [
        f"sequence   {len(plan.tasks)} stages into {plan.out}, bank policy {plan.spec.bank_policy}, "
        f"{'new label rows per task' if plan.spec.labels == 'new' else 'label rows shared by the tasks'}"
    ]
    for k, task in enumerate(plan.tasks, start=1):
        bank: Any = (
            "none"
            if not plan.base.reads_bank
            else (
                "merged banks of models 0.." + str(k - 1)
                if plan.spec.bank_policy == "accumulate"
                else f"bank of model {banks_needed(plan, k)[0]}"
            )
        )
        steps = task.steps or plan.base.train.max_steps
        lines.append(
            f"stage {k}    {task.name}: data {task.data}, {steps} steps, {bank}, into {plan.stage_dir(k).name}/"
        )
    measured = plan.spec.features or "nothing (set continual.features)"
    lines.append(f"measures   after every stage: FID on the source and every task seen, features {measured}")
    return lines
