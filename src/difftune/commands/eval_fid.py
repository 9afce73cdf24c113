"""``difftune eval fid``: FID (and optionally KID, precision/recall) of generated images against a reference.

Generated images come from a folder (``--fake``) or are sampled from a model (``--checkpoint``); the
reference is a folder, a built-in dataset (``--real digits:5,6,7,8,9``, :mod:`difftune.metrics.reference`)
or cached :class:`~difftune.metrics.FeatureStats` (``--real stats.npz``). A reference set's statistics are
also cached automatically (``--stats-cache``, see :mod:`difftune.metrics.reference_cache`), so a second
evaluation against it skips encoding it. All images travel as 8-bit RGB, the form FID is defined on:
sampled images are rounded to ``0..255`` exactly as ``difftune sample`` rounds them into PNGs, so scoring
a checkpoint equals scoring its sample folder. The work is split over the processes of an accelerate
launch (:mod:`difftune.metrics.distributed`), so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from difftune.commands import (
    INFERENCE_DTYPES,
    add_dtype_arg,
    add_model_args,
    check_domain_guidance,
    check_model_flags,
    check_positive,
    check_scheduler,
    inference_dtype,
    start_torch,
)
from difftune.commands.eval_inputs import EvalInputs, describe_plan, resolve_inputs
from difftune.config.sampling import add_sampling_args, given_sampling_flags, sampling_spec_from_args
from difftune.errors import UserError
from difftune.io.atomic import atomic_write_json
from difftune.io.image_formats import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from difftune.metrics.distributed import WorkDir
    from difftune.metrics.fid import FeatureStats

CHECKPOINT_ONLY = (
    "num_per_class",
    "labels",
    "prompts",
    "control_image",
    "subfolder",
    "vae",
    "domain_guidance",
    "dtype",
)  # with the sampling flags and --no-ema
DEFAULT_NUM_PER_CLASS = 50


def _check_args(args: argparse.Namespace) -> None:
    """Range checks, and sampling options only with ``--checkpoint``; fills in the sampling defaults."""
    check_positive(args, "batch_size", "workers", "kid_subsets", "pr_k", "resize")
    if args.stats_cache and args.no_stats_cache:
        raise UserError("--stats-cache and --no-stats-cache contradict each other: give one of them")
    if args.kid_subset_size < 2:
        raise UserError(f"--kid-subset-size must be >= 2, got {args.kid_subset_size}")
    given = ["--" + k.replace("_", "-") for k in CHECKPOINT_ONLY if getattr(args, k) is not None]
    given += given_sampling_flags(args) + (["--no-ema"] if args.no_ema else [])
    if args.fake is not None and given:
        raise UserError(f"{', '.join(given)} only apply with --checkpoint, not with --fake")
    if args.checkpoint is not None:
        if args.num_per_class is None:
            args.num_per_class = DEFAULT_NUM_PER_CLASS
        if args.num_per_class < 1:
            raise UserError(f"--num-per-class must be >= 1, got {args.num_per_class}")
        args.dtype = args.dtype or INFERENCE_DTYPES[0]
        check_condition_inputs(args.labels, args.prompts, args.control_image)
        spec = sampling_spec_from_args(args)
        check_scheduler(spec.scheduler)
        inference_dtype(args.dtype, _process_device())  # float16 on the CPU: refused before any loading
        check_model_flags(args, "checkpoint", "vae")
        check_domain_guidance(args.domain_guidance, spec.guidance_scale)
        vars(args).update(asdict(spec))  # the values used, also in the --out-json settings


def _process_device() -> str:
    """The device type this process will sample on, as accelerate picks it once the inputs are checked
    (:func:`cmd_eval_fid`): the CPU under ``ACCELERATE_USE_CPU`` or without an accelerator."""
    import torch
    from accelerate.utils import parse_flag_from_env

    accelerator = torch.accelerator.current_accelerator()
    return "cpu" if parse_flag_from_env("ACCELERATE_USE_CPU") or accelerator is None else accelerator.type


def check_condition_inputs(labels: str | None, prompts_file: str | None, controls: list[str] | None) -> None:
    """Refuse condition flags that exclude each other or name missing files, before anything is loaded:
    ``--labels`` (class-conditional models) with ``--prompts`` (text-conditional ones), ``--control-image``
    without prompts, an unreadable prompts file, and control images that are neither one nor one per prompt."""
    from difftune.commands.sample import check_control_images, read_prompts

    if labels is not None and prompts_file is not None:
        raise UserError(
            "--labels (class-conditional models) and --prompts (text-conditional models) exclude each other; "
            "give only the one your model takes"
        )
    if controls and prompts_file is None:
        raise UserError(
            "--control-image goes with --prompts (a ControlNet is text-conditional); add the prompts"
        )
    check_control_images(controls or (), read_prompts(None, prompts_file, "--prompts"))


def cmd_eval_fid(args: argparse.Namespace) -> int:
    """``difftune eval fid``: print ``fid <value>`` (and KID, precision/recall); return the exit code."""
    _check_args(args)
    start_torch()
    inputs = resolve_inputs(args)
    if args.dry_run:
        print(describe_plan(args, inputs))
        return 0
    from difftune.metrics.distributed import WorkDir
    from difftune.metrics.extractors import build_extractor

    extractor = build_extractor(args.features, args.inception_weights)
    dim = getattr(extractor, "num_features", None)
    if inputs.real_stats is not None and isinstance(dim, int) and dim != inputs.real_stats.num_features:
        raise UserError(
            f"{args.real}: feature dimension mismatch, file has {inputs.real_stats.num_features}, "
            f"--features {args.features} gives {dim}"
        )

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # as Accelerator does: without cpu=True a CPU-only torchrun launch is not seen as distributed
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise UserError(
            f"launched {launched} processes but accelerate sees {state.num_processes}; "
            "on CPU set ACCELERATE_USE_CPU=1 (or use `accelerate launch --cpu`)"
        )
    work = WorkDir(state, args.work_dir)
    try:
        _evaluate(args, inputs, extractor.to(state.device).eval(), state, work)
    except BaseException:
        work.close(wait=False)
        raise
    work.close()
    return 0


def _evaluate(
    args: argparse.Namespace, inputs: EvalInputs, extractor: nn.Module, state: Any, work: WorkDir
) -> None:
    """Features of this process's share of the items, gathered on the main process, which reports."""
    from difftune.metrics.distributed import (
        folder_batches,
        progress,
        run_extractor,
        sampled_batches,
        tensor_batches,
    )
    from difftune.metrics.kid import stats_from_features
    from difftune.metrics.reference_cache import write_cached_stats

    rank, world, main, device = state.process_index, state.num_processes, state.is_main_process, state.device
    real_stats, real_feats = inputs.real_stats, None
    if inputs.cache_hit and main:
        print(f"reference statistics from the cache: {inputs.real_cache}", file=sys.stderr)
    if inputs.real_paths is not None or inputs.real_images is not None:
        n = inputs.n_real
        mine = list(range(rank, n, world))
        if inputs.real_paths is not None:
            batches = folder_batches(inputs.real_paths, mine, args.batch_size, args.resize, args.workers)
        else:
            batches = tensor_batches(inputs.real_images, mine, args.batch_size, args.resize)  # type: ignore[arg-type]
        idx, feats, _ = run_extractor(
            progress(batches, len(mine), args.batch_size, "reference features", main),
            extractor,
            device,
            False,
        )
        gathered = work.gather("real", n, idx, feats, None, False)
        if gathered is not None:
            real_feats = gathered[0]
            real_stats = stats_from_features(real_feats)
            if inputs.real_cache is not None:
                write_cached_stats(real_stats, inputs.real_cache)
    if main and real_stats is not None and args.save_real_stats:
        real_stats.save(args.save_real_stats)

    mine = list(range(rank, inputs.n_fake, world))
    if inputs.fake_paths is not None:
        batches = folder_batches(inputs.fake_paths, mine, args.batch_size, args.resize, args.workers)
        desc = "generated features"
    else:
        loaded, cond, scheduler, guide = inputs.model  # type: ignore[misc]
        spec = sampling_spec_from_args(args)
        dtype = inference_dtype(args.dtype, device)  # the models' precision; the extractor's stays float32
        batches = sampled_batches(
            loaded, cond, mine, scheduler, spec, args.batch_size, args.resize, device, guide, dtype
        )
        desc = "sampling + features"
    keep = bool(args.export_npz)
    idx, feats, images = run_extractor(
        progress(batches, len(mine), args.batch_size, desc, main), extractor, device, keep
    )
    gathered = work.gather("fake", inputs.n_fake, idx, feats, images, keep)
    if gathered is not None:
        assert real_stats is not None
        _report(args, real_stats, real_feats, *gathered, world, device)


def _report(
    args: argparse.Namespace,
    real_stats: FeatureStats,
    real_feats: Tensor | None,
    fake_feats: Tensor,
    fake_images: Tensor | None,
    world: int,
    device: torch.device | str,
) -> None:
    """Main process: compute, print and save the metrics; export the generated images."""
    from difftune.io.images import export_npz
    from difftune.metrics.fid import fid_from_stats
    from difftune.metrics.kid import kernel_inception_distance, precision_recall, stats_from_features

    if fake_feats.shape[1] != real_stats.num_features:
        raise UserError(
            f"{args.real}: feature dimension mismatch, reference has {real_stats.num_features}, "
            f"--features {args.features} gives {fake_feats.shape[1]}"
        )
    if fake_images is not None:
        export_npz(fake_images.permute(0, 2, 3, 1).numpy(), args.export_npz)  # (N, H, W, 3)
    results: dict[str, Any] = {"fid": fid_from_stats(real_stats, stats_from_features(fake_feats))}
    if args.kid:
        assert real_feats is not None
        kid, kid_std, size = kernel_inception_distance(
            real_feats, fake_feats, args.kid_subsets, args.kid_subset_size, seed=0
        )
        results.update(kid=kid, kid_std=kid_std, kid_subset_size=size)
    if args.precision_recall:
        assert real_feats is not None
        results["precision"], results["recall"] = precision_recall(
            real_feats, fake_feats, args.pr_k, device=device
        )
    for key in ("fid", "kid", "kid_std", "precision", "recall"):
        if key in results:
            print(f"{key} {results[key]:.10g}")
    results.update(
        num_real=real_stats.count,
        num_fake=int(fake_feats.shape[0]),
        feature_dim=real_stats.num_features,
        num_processes=world,
    )
    if args.out_json:
        settings = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
        atomic_write_json(args.out_json, {**results, "settings": settings})


def add_parser(subparsers: Any) -> None:
    """Register ``eval`` (with its ``fid`` sub-command) on the ``difftune`` sub-parsers."""
    p = subparsers.add_parser("eval", help="evaluate generated images (FID, KID, precision/recall)")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="{fid}")
    f = sub.add_parser(
        "fid",
        help="FID of generated images (a folder, or sampled from a checkpoint) against reference images",
        description="FID of generated images against reference images or cached statistics. Multi-process with "
        "`accelerate launch -m difftune eval fid ...` (sampling and features are split over the processes).",
    )
    formats = "/".join(ext[1:] for ext in IMAGE_EXTENSIONS)
    f.add_argument(
        "--real",
        required=True,
        help=f"reference: image folder ({formats}, recursive), built-in dataset (digits or digits:5,6,7,8,9) "
        "or statistics .npz",
    )
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--fake", help=f"folder of generated images ({formats}, recursive)")
    src.add_argument(
        "--checkpoint", help="model directory (or hub id) to sample from, as `difftune sample --model`"
    )
    g = f.add_argument_group(
        "sampling (with --checkpoint; image i, in label-major (or prompt-major) order, uses seed + i)"
    )
    add_model_args(g)
    g.add_argument(
        "--num-per-class",
        type=int,
        help=f"images per label or per prompt (default {DEFAULT_NUM_PER_CLASS}: 50K for 1000 classes)",
    )
    g.add_argument("--labels", help="comma-separated class labels (default: all classes)")
    g.add_argument(
        "--prompts",
        metavar="FILE",
        help="a text-conditional model's prompts: a text file, one prompt per line",
    )
    g.add_argument(
        "--control-image",
        action="append",
        help="a ControlNet's control image: one for all prompts, or one per prompt",
    )
    g.add_argument(
        "--domain-guidance",
        metavar="PRETRAINED",
        help="domain guidance: the pre-trained model as the guidance branch (with --guidance-scale > 1)",
    )
    add_sampling_args(g, with_defaults=False)
    add_dtype_arg(g, default=None)
    g = f.add_argument_group("features and metrics")
    g.add_argument(
        "--features", default="inception", help="inception (default), digits:PATH or module:function"
    )
    g.add_argument("--inception-weights", help="local FID Inception weights (pt_inception-2015-12-05-*.pth)")
    g.add_argument(
        "--save-real-stats", metavar="PATH.npz", help="write the reference statistics here for reuse"
    )
    g.add_argument(
        "--stats-cache",
        metavar="DIR",
        help="where reference-set statistics are cached (default $XDG_CACHE_HOME/difftune/fid_stats)",
    )
    g.add_argument(
        "--no-stats-cache", action="store_true", help="neither read nor write the statistics cache"
    )
    g.add_argument("--kid", action="store_true", help="also KID (polynomial-kernel MMD over random subsets)")
    g.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    g.add_argument(
        "--kid-subset-size", type=int, default=1000, help="KID subset size, capped at the set sizes"
    )
    g.add_argument(
        "--precision-recall", action="store_true", help="also k-NN precision/recall (O(N^2) distances)"
    )
    g.add_argument(
        "--pr-k", type=int, default=3, help="neighbourhood size k for precision/recall (default 3)"
    )
    g = f.add_argument_group("input and output")
    g.add_argument(
        "--resize", type=int, metavar="N", help="resize every image to NxN (PIL bicubic) before features"
    )
    g.add_argument(
        "--batch-size", type=int, default=64, help="images per forward pass (does not change results)"
    )
    g.add_argument("--workers", type=int, default=4, help="threads decoding image files")
    g.add_argument(
        "--export-npz", metavar="PATH.npz", help="save the generated images as uint8 (N, H, W, 3) 'arr_0'"
    )
    g.add_argument("--out-json", metavar="PATH", help="write the metrics and settings as JSON")
    g.add_argument(
        "--work-dir", help="folder shared by the processes for partial results (default: a temp folder)"
    )
    g.add_argument(
        "--dry-run", action="store_true", help="validate the inputs and print the plan, do nothing"
    )
    f.set_defaults(func=cmd_eval_fid)
