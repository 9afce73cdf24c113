"""What ``difftune train --dry-run`` checks before anything is loaded, encoded or trained.

The model's config (no weights: the network is built on the ``meta`` device), the number of target
classes against the model's label rows, the bank's manifest against the model, the memory a process
will need (:mod:`difftune.training.memory_estimate`), and that the output folder can be written. Each problem is the one-line error a real run would meet later, after
minutes of loading and encoding.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from difftune.backbones.adapters import adapter_directory, read_record
from difftune.backbones.family import PreflightFacts
from difftune.backbones.loading import peek_backbone
from difftune.bank.conditions import check_bank_conditions
from difftune.bank.prompts import check_prompt_mode
from difftune.bank.teacher_draws import check_stored
from difftune.config.data import BUILT_IN_SOURCES
from difftune.config.experiment import ExperimentConfig
from difftune.control.validation import check_validation
from difftune.data.builtin import built_in_class_count
from difftune.errors import UserError
from difftune.io.store import LatentStore
from difftune.training.memory_estimate import estimate_training_memory
from difftune.training.sharding import check_sharded_settings


def check_writable(folder: Path) -> None:
    """Refuse an output folder that cannot be created or written (without leaving anything behind)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"train.output_dir {str(folder)!r} cannot be created: {existing} is a file; choose another train.output_dir"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".difftune-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(
            f"train.output_dir {str(folder)!r} is not writable ({err.strerror}); choose another"
        ) from None


def _target_classes(cfg: ExperimentConfig) -> int:
    """Classes of a labelled target set; images of a captioned one (read from its listing only)."""
    if cfg.data.source == "captions":
        from difftune.data.captions import read_metadata

        return len(read_metadata(Path(cfg.data.path or ""), cfg.data.caption_column, cfg.data.control_column))
    if cfg.data.source == "hf_dataset":
        return 0  # counted when the dataset is opened by the run
    if cfg.data.source in BUILT_IN_SOURCES:
        return len(set(cfg.data.classes)) if cfg.data.classes else built_in_class_count(cfg.data.source)
    from difftune.data.targets import class_folders

    class_dirs, _, _ = class_folders(Path(cfg.data.path or ""), cfg.data.on_bad_file)
    return len(class_dirs)


def preflight(cfg: ExperimentConfig) -> list[str]:
    """Check that ``cfg`` can start training; returns the facts found, one line each, for the plan.

    Raises:
        UserError: the first problem, in the words the run itself would use.
    """
    classes = _target_classes(cfg)
    pretrained = cfg.model.pretrained
    adapter = adapter_directory(pretrained)
    if adapter is not None:  # an adapter trained further: its base is checked
        pretrained = read_record(adapter).base.get("source") or pretrained
    local = Path(pretrained).exists()
    try:  # a hub model is checked from the local cache only: a dry run does not download
        backbone = peek_backbone(
            pretrained,
            cfg.model.subfolder,
            cfg.model.revision,
            local_only=not local,
            controlnet=cfg.model.controlnet,
        )
    except FileNotFoundError:
        if local:
            raise
        return [
            f"model      {cfg.model.pretrained}: not in the local hub cache, so not checked (a real run downloads it)",
            f"target     {classes} classes",
            *_output_lines(cfg),
        ]
    check_validation(cfg.train.validation_every, backbone, cfg.data.annotator)
    check_prompt_mode(
        cfg.bank, backbone, cfg.model.pretrained
    )  # the config's `difftune bank` would refuse it
    facts = PreflightFacts(classes, lambda: _target_line(cfg, classes), lambda: _control_line(cfg))
    lines = backbone.family.preflight_lines(backbone, facts)  # refuses a target the model cannot take
    largest = None  # data.buckets: the largest bucket, whose activations the memory estimate traces
    if cfg.data.buckets.enabled:
        line, largest = _bucket_line(cfg, backbone, Path(pretrained) if local else None)
        lines.append(line)
    if cfg.reads_bank and cfg.data.buckets.enabled:
        lines.append(_bucket_bank_line(cfg, backbone))
    elif cfg.reads_bank:
        manifest = LatentStore(cfg.bank.path).manifest
        if manifest.get("kind") != "bank":
            raise UserError(f"{cfg.bank.path} is not a knowledge bank (kind={manifest.get('kind')!r})")
        if manifest.get("shape") != list(backbone.sample_shape):
            raise UserError(
                f"bank {cfg.bank.path} holds samples of shape {manifest.get('shape')} but the model works on "
                f"{list(backbone.sample_shape)}; regenerate the bank with this model"
            )
        check_bank_conditions(manifest, backbone, cfg.data.annotator, cfg.bank.path)
        record = backbone.bank_record() if cfg.bank.made_by == "this_model" else {}  # a grown table differs
        for key, value in record.items():
            if value is not None and manifest.get(key) != value:  # None: set only when the bank is made
                raise UserError(
                    f"bank {cfg.bank.path} was made for {key}={manifest.get(key)!r}, the model has {value!r}; "
                    "regenerate the bank with this model"
                )
        lines.append(f"bank       {manifest['num_samples']} samples from {manifest.get('source')}")
        if (
            cfg.stores_teacher
        ):  # what the run's objective fixes without the model's process; the rest at start
            d = cfg.objective.distillation
            check_stored(manifest, {"draws": d.stored_draws, "condition": cfg.bank.condition}, cfg.bank.path)
            lines.append(f"teacher    stored in the bank: {d.stored_draws} draws per sample, no teacher copy")
    if cfg.objective.fitted_schedules:
        from difftune.training.fitted_schedule import planned_fit

        lines.append(f"schedules  {planned_fit(cfg)}")
    if cfg.train.eval_every:
        lines.append(f"evaluate   {_evaluation_line(cfg)}")
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    root = Path(pretrained) if local else None
    sharded = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # an FSDP accelerate config
    if sharded:
        check_sharded_settings(cfg)
    memory = estimate_training_memory(cfg, backbone, root, processes, largest, sharded)
    lines.append(memory.line())  # last: it tunes backbone
    return lines + _output_lines(cfg)


def _bucket_line(
    cfg: ExperimentConfig, backbone: Any, root: Path | None
) -> tuple[str, tuple[str, tuple[int, int, int]]]:
    """The target's buckets and their image counts (``data.buckets``), from the images' headers, each
    checked against the model; and the name and sample shape of the largest (the memory estimate's)."""
    from difftune.data.buckets import check_bucket_fit, check_bucket_model, largest_bucket
    from difftune.data.targets import planned_buckets

    downsample = _vae_factor(cfg, root)
    check_bucket_model(backbone, downsample, cfg.data.buckets)
    plan = planned_buckets(cfg.data)
    check_bucket_fit(backbone, plan.buckets, downsample)
    big = largest_bucket(plan.buckets)
    shape = big.sample_shape(backbone.sample_shape[0], downsample)
    return f"buckets    {plan.line()}; largest {big.name}", (big.name, shape)


def _vae_factor(cfg: ExperimentConfig, root: Path | None) -> int:
    """The downsampling factor of the model's VAE, from its config (``model.vae``, else the pipeline's
    ``vae/``): 2^(blocks - 1); 8, every Stable Diffusion VAE's, when neither is a local folder."""
    vae = Path(cfg.model.vae) if cfg.model.vae else (root / "vae" if root else None)
    for folder in (vae / "vae", vae) if vae else ():
        if (folder / "config.json").is_file():
            blocks = json.loads((folder / "config.json").read_text()).get("block_out_channels", [0] * 4)
            return 2 ** (len(blocks) - 1)
    return 8


def _bucket_bank_line(cfg: ExperimentConfig, backbone: Any) -> str:
    """The bank of every bucket (``data.buckets``), each checked against the model's conditions."""
    from difftune.bank.buckets import bank_buckets

    buckets, total = bank_buckets(Path(cfg.bank.path)), 0
    for bucket in buckets:
        path = str(Path(cfg.bank.path) / bucket.folder)
        manifest = LatentStore(path).manifest
        if manifest.get("kind") != "bank":
            raise UserError(f"{path} is not a knowledge bank (kind={manifest.get('kind')!r})")
        check_bank_conditions(manifest, backbone, cfg.data.annotator, path)
        total += manifest["num_samples"]
    return f"bank       {total} samples in the buckets {', '.join(b.name for b in buckets)}"


def _evaluation_line(cfg: ExperimentConfig) -> str:
    """What ``train.eval_every`` measures, in one line."""
    tc, spec = cfg.train, cfg.train.evaluation
    parts = []
    if spec.holdout:
        parts.append(f"loss of {spec.holdout} held-out target images")
    if spec.bank_holdout:
        parts.append(f"loss of {spec.bank_holdout} held-out bank samples")
    if spec.reference and not Path(spec.reference).is_file():  # found now, not at the first evaluation
        raise UserError(
            f"train.evaluation.reference {spec.reference!r} does not exist; give the .npz of "
            "`difftune eval fid --save-real-stats`, or leave it out to score against held-out target images"
        )
    if spec.features:
        parts.append(f"FID/KID of {spec.samples} samples on {spec.features} features")
    if spec.samples and cfg.bank.path:
        parts.append(f"forgetting on {spec.samples} bank samples")
    best = f"; best/ by {tc.keep_best}" if tc.keep_best else ""
    what = ", ".join(parts) or "nothing (set train.evaluation: holdout, bank_holdout, samples, features)"
    return f"every {tc.eval_every} steps: {what}{best}"


def _target_line(cfg: ExperimentConfig, count: int) -> str:
    if cfg.data.source == "captions":
        return f"the target has {count} captioned images"
    if cfg.data.source == "hf_dataset":
        return f"the target is the saved dataset {cfg.data.path}"
    return f"the target's {count} classes are captioned {cfg.data.caption_template!r}"


def _control_line(cfg: ExperimentConfig) -> str:
    """How control images are made; an unknown annotator is refused here, as the run would."""
    if cfg.data.annotator:
        from difftune.control import build_annotator

        return f"control    computed by {build_annotator(cfg.data.annotator).record()}"
    if cfg.data.control_column:
        return f"control    images from the data's column {cfg.data.control_column!r}"
    raise UserError(
        "a ControlNet needs control images: set data.annotator (e.g. canny) or data.control_column"
    )


def _output_lines(cfg: ExperimentConfig) -> list[str]:
    check_writable(Path(cfg.train.output_dir))
    return [f"writable   {cfg.train.output_dir}"]
