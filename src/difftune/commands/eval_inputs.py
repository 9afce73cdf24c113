"""The inputs of ``difftune eval fid``, checked and resolved before any heavy work: the reference (statistics,
a folder or a built-in dataset, or its cached statistics), the generated images or the model to sample."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.commands.sample import listed_samples
from difftune.config.sampling import sampling_spec_from_args
from difftune.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

    from difftune.backbones.conditioning import Conditioning
    from difftune.metrics.fid import FeatureStats


def load_model_to_sample(args: argparse.Namespace) -> tuple[Any, Conditioning, Any, Any]:
    """The model of ``--checkpoint`` (EMA weights by default), the condition of every item (each label, or
    each prompt of ``--prompts`` with its ``--control-image``, ``--num-per-class`` times), the scheduler,
    and the ``--domain-guidance`` model (or None)."""
    import torch

    from difftune.backbones import ConditionRequest, load_trained
    from difftune.commands.sample import parse_labels, read_prompts
    from difftune.sampling.generate import build_scheduler, load_guide

    loaded = load_trained(args.checkpoint, args.subfolder, not args.no_ema, args.vae)
    request = ConditionRequest(
        labels=None if args.labels is None else parse_labels(args.labels),
        prompts=read_prompts(None, args.prompts, "--prompts"),
        controls=args.control_image or (),
        model=args.checkpoint,
        prompt_flag="--prompts",
    )
    rows, _ = loaded.family.sample_conditions(loaded, request)  # every class when no labels are given
    options = dict(getattr(args, "scheduler_options", None) or ())
    scheduler = build_scheduler(
        args.scheduler, loaded.scheduler_config, loaded.backbone.sample_shape, options
    )
    guide = load_guide(args.domain_guidance, loaded, args.vae) if args.domain_guidance else None
    cond = rows.select(torch.arange(rows.batch_size).repeat_interleave(args.num_per_class))
    return loaded, cond, scheduler, guide


@dataclass
class EvalInputs:
    """The validated sources: reference stats or image paths, generated image paths or a model to sample."""

    real_stats: FeatureStats | None
    real_paths: list[Path] | None
    real_images: Tensor | None  # a built-in dataset, uint8 RGB (N, 3, H, W)
    fake_paths: list[Path] | None
    # (loaded model, condition of each item, scheduler, guide)
    model: tuple[Any, Conditioning, Any, Any] | None
    real_cache: Path | None = None  # where the reference set's statistics are (or will be) cached
    cache_hit: bool = False

    @property
    def n_real(self) -> int:
        if self.real_stats is not None:
            return self.real_stats.count
        if self.real_paths is not None:
            return len(self.real_paths)
        return len(self.real_images) if self.real_images is not None else 0

    @property
    def n_fake(self) -> int:
        if self.fake_paths is not None:
            return len(self.fake_paths)
        return self.model[1].batch_size if self.model else 0


def resolve_inputs(args: argparse.Namespace) -> EvalInputs:
    """Check every input before any heavy work (all processes do the same, so they fail alike)."""
    from difftune.io.images import list_images
    from difftune.io.store import folder_identity
    from difftune.metrics.fid import FeatureStats
    from difftune.metrics.reference import reference_dataset
    from difftune.metrics.reference_cache import load_cached_stats, reference_cache_file

    real_stats, real_paths, real_images, identity = None, None, None, None
    if Path(args.real).suffix.lower() == ".npz":
        if not Path(args.real).is_file():
            raise FileNotFoundError(f"reference statistics {args.real!r} do not exist")
        if args.save_real_stats:
            raise UserError(
                "--save-real-stats needs --real to be images (a folder or a dataset), not statistics"
            )
        if args.kid or args.precision_recall:
            raise UserError(
                "--kid and --precision-recall need reference images: give --real as an image folder or a dataset"
            )
        real_stats = FeatureStats.load(args.real)
    elif (dataset := reference_dataset(args.real)) is not None:
        identity, real_images = dataset
    else:
        real_paths = list_images(args.real)
        identity = folder_identity(args.real, real_paths)
    fake_paths = None
    if args.fake is not None:  # a difftune sample folder: its images, not its grid
        fake_paths = listed_samples(args.fake) or list_images(args.fake)
    model = load_model_to_sample(args) if args.checkpoint else None
    inputs = EvalInputs(real_stats, real_paths, real_images, fake_paths, model)
    if identity is not None:
        inputs.real_cache = (
            None
            if args.no_stats_cache
            else reference_cache_file(
                identity, args.features, args.inception_weights, args.resize, args.stats_cache
            )
        )
        cached = (
            load_cached_stats(inputs.real_cache, inputs.n_real) if inputs.real_cache is not None else None
        )
        # KID and precision/recall need the reference features themselves, which the cache does not hold
        if cached is not None and not (args.kid or args.precision_recall):
            inputs.real_stats, inputs.real_paths, inputs.real_images, inputs.cache_hit = (
                cached,
                None,
                None,
                True,
            )
    if min(inputs.n_real, inputs.n_fake) < 2:
        raise UserError(
            f"FID needs at least 2 images per set, got {inputs.n_real} reference and {inputs.n_fake} generated"
        )
    return inputs


def describe_plan(args: argparse.Namespace, inputs: EvalInputs) -> str:
    """The dry run's line: what would be scored against what."""
    if args.fake is not None:
        source = args.fake
    else:
        spec = sampling_spec_from_args(args)
        precision = f", in {args.dtype}" if args.dtype != "float32" else ""
        seeds = f"seeds {spec.seed}..{spec.seed + inputs.n_fake - 1}"
        source = f"{args.checkpoint} ({spec.describe()}{precision}, {seeds})"
    cache = f"; reference statistics cached in {inputs.real_cache}" if inputs.cache_hit else ""
    return (
        f"would score {inputs.n_fake} generated images from {source} against {inputs.n_real} reference images "
        f"({args.real}) with --features {args.features}{cache}"
    )
