"""``difftune eval fid``: FID (and optionally KID, precision/recall) of generated images against a reference.

Generated images come from a folder (``--fake``) or are sampled from a model (``--checkpoint``); the
reference is a folder, a built-in dataset (``--real digits:5,6,7,8,9``) or cached
:class:`~difftune.metrics.FeatureStats` (``--real stats.npz``). A reference set's statistics are also
cached automatically (``--stats-cache``, see :mod:`difftune.metrics.reference_cache`), so a second
evaluation against it skips encoding it. All
images travel as 8-bit RGB, the form FID is defined on: sampled images are rounded to ``0..255`` exactly
as ``difftune sample`` rounds them into PNGs, so scoring a checkpoint equals scoring its sample folder.

Work is split over the processes of an accelerate launch (``PartialState``): item ``i`` (an image file,
or the ``i``-th (label, seed) to sample) goes to the process with rank ``i mod P``. Each process writes its
features ``(n_rank, D)`` with their item indices to the work directory; the main process puts them back in
item order and computes the metrics, so the numbers do not depend on ``P`` or the batch size.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from tqdm.auto import tqdm

from difftune.atomic import atomic_open, atomic_path, atomic_write_json
from difftune.metrics.fid import FeatureStats, fid_from_stats
from difftune.metrics.kid import kernel_inception_distance, precision_recall, stats_from_features
from difftune.metrics.reference_cache import load_cached_stats, reference_stats_key
from difftune.store import folder_identity, user_cache_dir

__all__ = [
    "IMAGE_EXTENSIONS",
    "add_eval_parser",
    "build_extractor",
    "cmd_eval_fid",
    "export_npz",
    "kernel_inception_distance",
    "list_images",
    "load_image",
    "precision_recall",
    "reference_dataset",
    "stats_from_features",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FEATURE_SPECS = ("inception", "digits:PATH", "module:function")
Batches = Iterator[tuple[np.ndarray, Tensor]]  # (item indices (B,), uint8 images (B, 3, H, W))


# ---------------------------------------------------------------------------------------------- images
def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """All PNG/JPEG files under ``folder`` (recursively), sorted by path.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: ``folder`` is not a directory or holds no image.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"{str(folder)!r} is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise ValueError(f"no PNG/JPEG images in {str(folder)!r} (searched recursively)")
    return paths


def load_image(path: str | os.PathLike[str], resize: int | None = None) -> Tensor:
    """One image file as uint8 RGB ``(3, H, W)``, optionally resized to ``resize x resize`` (PIL bicubic).

    Raises:
        ValueError: the file cannot be decoded (the message names it).
    """
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {str(path)!r}: {err}") from None
    if resize is not None and rgb.size != (resize, resize):
        rgb = rgb.resize((resize, resize), Image.BICUBIC)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def reference_dataset(spec: str) -> tuple[str, Tensor] | None:
    """The built-in dataset that ``--real`` names, as (canonical name, uint8 RGB images ``(N, 3, H, W)``).

    ``digits`` is scikit-learn's handwritten digits (1797 images of 8x8, shipped with scikit-learn);
    ``digits:5,6,7,8,9`` keeps those classes. Returns ``None`` when ``spec`` names no dataset or is an
    existing path (a folder called ``digits`` is a folder).

    Raises:
        ValueError: the class list is not digits 0-9.
    """
    name, colon, classes_text = spec.partition(":")
    if name != "digits" or Path(spec).exists():
        return None
    from difftune.datasets import load_sklearn_digits

    images, labels = load_sklearn_digits()
    if colon:
        parts = [c.strip() for c in classes_text.split(",")]
        if not all(c.isdigit() and len(c) == 1 for c in parts):
            raise ValueError(f"--real {spec!r}: give digit classes 0-9, comma-separated, e.g. digits:5,6,7,8,9")
        classes = sorted({int(c) for c in parts})
        images = images[torch.isin(labels, torch.tensor(classes))]
        name = "digits:" + ",".join(map(str, classes))
    return name, _quantize(images, None)


def _quantize(images: Tensor, resize: int | None) -> Tensor:
    """Float images ``(B, C, H, W)`` in ``[0, 1]`` -> uint8 RGB ``(B, 3, H', W')``, as a PNG round trip does."""
    x = (images.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if resize is not None and tuple(x.shape[-2:]) != (resize, resize):
        pils = [Image.fromarray(im.permute(1, 2, 0).numpy()).resize((resize, resize), Image.BICUBIC) for im in x]
        x = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pils])
    return x.contiguous()


def _folder_batches(
    paths: Sequence[Path], indices: Sequence[int], batch_size: int, resize: int | None, workers: int
) -> Batches:
    """Decode ``paths[i]`` for ``i`` in ``indices`` in batches, on ``workers`` threads."""
    # every process checks against the same size: the first image's, unless resized
    expected = (resize, resize) if resize else tuple(load_image(paths[0]).shape[-2:])
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(indices), batch_size):
            idx = np.asarray(indices[start : start + batch_size], dtype=np.int64)
            images = list(pool.map(lambda i: load_image(paths[i], resize), idx))
            for i, im in zip(idx, images, strict=True):
                if tuple(im.shape[-2:]) != expected:
                    raise ValueError(
                        f"image {str(paths[i])!r} is {im.shape[-1]}x{im.shape[-2]} but {str(paths[0])!r} is "
                        f"{expected[1]}x{expected[0]}: give --resize N to score images of different sizes"
                    )
            yield idx, torch.stack(images)


def _tensor_batches(images: Tensor, indices: Sequence[int], batch_size: int, resize: int | None) -> Batches:
    """In-memory uint8 images ``images[i]`` for ``i`` in ``indices``, in batches, resized as files would be."""
    for start in range(0, len(indices), batch_size):
        idx = np.asarray(indices[start : start + batch_size], dtype=np.int64)
        batch = images[torch.from_numpy(idx)]
        yield idx, batch if resize is None else _quantize(batch.float() / 255, resize)


def export_npz(images: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write uint8 images ``(N, H, W, 3)`` as guided-diffusion's evaluator reads them (key ``arr_0``), atomically."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    with atomic_open(path) as f:
        np.savez(f, arr_0=images)


# -------------------------------------------------------------------------------------------- features
def build_extractor(spec: str, inception_weights: str | None = None) -> nn.Module:
    """Feature extractor named by ``--features``: float images ``(B, C, H, W)`` in ``[0, 1]`` -> ``(B, D)``.

    ``inception`` is the FID Inception-v3 (:func:`~difftune.metrics.inception.inception_extractor`);
    ``digits:PATH`` a saved :class:`~difftune.metrics.DigitClassifier`; ``module:function`` calls
    ``function()`` of an importable module, which must return an ``nn.Module``.

    Raises:
        ValueError / FileNotFoundError: unknown spec, missing file, or a bad custom extractor.
    """
    if spec == "inception":
        from difftune.metrics.inception import inception_extractor

        return inception_extractor(inception_weights)
    if inception_weights is not None:
        raise ValueError(f"--inception-weights only applies to --features inception, not {spec!r}")
    kind, _, rest = spec.partition(":")
    if not kind or not rest:
        raise ValueError(f"--features {spec!r} is not understood; valid: {', '.join(FEATURE_SPECS)}")
    if kind == "digits":
        from difftune.metrics.digits import DigitFeatureExtractor, load_classifier

        if not Path(rest).is_file():
            raise FileNotFoundError(f"digit classifier {rest!r} not found (--features digits:PATH)")
        try:
            return DigitFeatureExtractor(load_classifier(rest))
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own error type on a file that is not safetensors
            raise ValueError(f"{rest}: not a DigitClassifier file ({type(err).__name__}: {err})") from None
    try:
        module = importlib.import_module(kind)
    except ImportError as err:
        raise ValueError(f"--features {spec!r}: cannot import module {kind!r} ({err})") from None
    factory = getattr(module, rest, None)
    if not callable(factory):
        raise ValueError(f"--features {spec!r}: module {kind!r} has no callable {rest!r}")
    extractor = factory()
    if not isinstance(extractor, nn.Module):
        raise ValueError(f"--features {spec!r} returned {type(extractor).__name__}, expected a torch.nn.Module")
    return extractor


# ------------------------------------------------------------------------------------------ processes
class _WorkDir:
    """Folder where each process leaves its features for the main process; a shared temporary one by default."""

    def __init__(self, state: Any, requested: str | None) -> None:
        self.state = state
        self.owned = requested is None
        path: str | None = requested
        if self.owned:
            path = tempfile.mkdtemp(prefix="difftune-eval-") if state.is_main_process else None
            if state.num_processes > 1:  # one folder for all processes (on one machine, or a shared disk)
                from accelerate.utils import broadcast_object_list

                box = [path]
                broadcast_object_list(box)
                path = box[0]
        self.path = Path(str(path))
        self.path.mkdir(parents=True, exist_ok=True)

    def gather(
        self, tag: str, total: int, indices: np.ndarray, feats: Tensor, images: Tensor | None, keep_images: bool
    ) -> tuple[Tensor, Tensor | None] | None:
        """All processes' features ``(total, D)`` (and uint8 images) in item order, on the main process only."""
        rank, world = self.state.process_index, self.state.num_processes
        with atomic_path(self.path / f"{tag}-rank{rank:04d}.pt") as tmp:
            torch.save({"index": torch.from_numpy(indices), "features": feats, "images": images}, tmp)
        self.state.wait_for_everyone()
        if not self.state.is_main_process:
            return None
        files = [self.path / f"{tag}-rank{r:04d}.pt" for r in range(world)]
        parts = [p for p in (torch.load(f, weights_only=True) for f in files) if p["index"].numel()]
        for f in files:
            f.unlink(missing_ok=True)
        index = torch.cat([p["index"] for p in parts])
        order = torch.argsort(index)
        if not torch.equal(index[order], torch.arange(total)):
            raise RuntimeError(f"{tag}: the processes returned items {index.tolist()[:10]}..., expected 0..{total - 1}")
        all_images = torch.cat([p["images"] for p in parts])[order] if keep_images else None
        return torch.cat([p["features"] for p in parts])[order], all_images

    def close(self, wait: bool = True) -> None:
        """Wait for every process (unless failing), then remove the folder if it was a temporary one."""
        if wait:
            self.state.wait_for_everyone()
        if self.owned and self.state.is_main_process:
            shutil.rmtree(self.path, ignore_errors=True)


@torch.no_grad()
def _run_extractor(
    batches: Batches, extractor: nn.Module, device: torch.device | str, keep_images: bool
) -> tuple[np.ndarray, Tensor, Tensor | None]:
    """Item indices ``(n,)``, float64 features ``(n, D)`` and (if kept) uint8 images ``(n, 3, H, W)``."""
    indices, feats, kept = [], [], []
    for idx, images in batches:
        out = extractor(images.to(device).float() / 255.0)  # (B, D)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != images.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the feature extractor must return (B, D) features with B={images.shape[0]}, got {shape}")
        indices.append(idx)
        feats.append(out.detach().to("cpu", torch.float64))
        if keep_images:
            kept.append(images)
    if not feats:
        return np.zeros(0, dtype=np.int64), torch.zeros(0, 0, dtype=torch.float64), None
    return np.concatenate(indices), torch.cat(feats), torch.cat(kept) if keep_images else None


def _sample_batches(
    loaded: Any, labels: Tensor, indices: Sequence[int], args: argparse.Namespace, scheduler: Any,
    device: torch.device | str,
) -> Batches:
    """Sample items ``indices``: item ``i`` has label ``labels[i]`` and seed ``args.seed + i``."""
    from difftune.sampling import generate, to_unit_range

    backbone = loaded.backbone.to(device).eval()
    codec = loaded.codec.to(device)
    for start in range(0, len(indices), args.batch_size):
        idx = np.asarray(indices[start : start + args.batch_size], dtype=np.int64)
        x = generate(
            backbone, scheduler, labels[idx], [args.seed + int(i) for i in idx], backbone.sample_shape,
            backbone.null_label, guidance_scale=args.guidance_scale, num_inference_steps=args.steps, device=device,
        )
        yield idx, _quantize(to_unit_range(codec.decode(x)), args.resize)


def _progress(batches: Batches, n_items: int, batch_size: int, desc: str, enabled: bool) -> Batches:
    return tqdm(batches, total=math.ceil(n_items / batch_size), desc=desc, unit="batch", disable=not enabled)


# ---------------------------------------------------------------------------------------------- command
SAMPLING_DEFAULTS = {
    "num_per_class": 50, "labels": None, "scheduler": "DPMSolverMultistepScheduler", "steps": 25,
    "guidance_scale": 1.5, "seed": 0, "subfolder": None, "vae": None,
}


def _check_args(args: argparse.Namespace) -> None:
    """Range checks, and sampling options only with ``--checkpoint``; fills in the sampling defaults."""
    for name in ("batch_size", "workers", "kid_subsets", "pr_k"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.resize is not None and args.resize < 1:
        raise ValueError(f"--resize must be >= 1, got {args.resize}")
    if args.stats_cache and args.no_stats_cache:
        raise ValueError("--stats-cache and --no-stats-cache contradict each other: give one of them")
    if args.kid_subset_size < 2:
        raise ValueError(f"--kid-subset-size must be >= 2, got {args.kid_subset_size}")
    given = [k for k in SAMPLING_DEFAULTS if getattr(args, k) is not None] + (["no_ema"] if args.no_ema else [])
    if args.fake is not None and given:
        opts = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{opts} only apply with --checkpoint, not with --fake")
    if args.checkpoint is not None:
        for key, value in SAMPLING_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        if args.num_per_class < 1 or args.steps < 1:
            raise ValueError("--num-per-class and --steps must be >= 1")


def _load_model(args: argparse.Namespace) -> tuple[Any, Tensor, Any]:
    """The model of ``--checkpoint`` (EMA weights by default), the label of every item, and the scheduler."""
    from difftune.backbones import load_trained
    from difftune.sampling import build_scheduler, parse_labels

    loaded = load_trained(args.checkpoint, args.subfolder, not args.no_ema, args.vae)
    num_classes = loaded.backbone.num_classes
    labels = list(range(num_classes)) if args.labels is None else parse_labels(args.labels, num_classes)
    scheduler = build_scheduler(args.scheduler, loaded.scheduler_config)
    return loaded, torch.tensor(labels).repeat_interleave(args.num_per_class), scheduler


@dataclass
class _Inputs:
    """The validated sources: reference stats or image paths, generated image paths or a model to sample."""

    real_stats: FeatureStats | None
    real_paths: list[Path] | None
    real_images: Tensor | None  # a built-in dataset, uint8 RGB (N, 3, H, W)
    fake_paths: list[Path] | None
    model: tuple[Any, Tensor, Any] | None  # (loaded model, label of each item (N,), scheduler)
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
        return len(self.fake_paths) if self.fake_paths is not None else len(self.model[1]) if self.model else 0


def _resolve_inputs(args: argparse.Namespace) -> _Inputs:
    """Check every input before any heavy work (all processes do the same, so they fail alike)."""
    real_stats, real_paths, real_images, identity = None, None, None, None
    if Path(args.real).suffix.lower() == ".npz":
        if not Path(args.real).is_file():
            raise FileNotFoundError(f"reference statistics {args.real!r} do not exist")
        if args.save_real_stats:
            raise ValueError("--save-real-stats needs --real to be images (a folder or a dataset), not statistics")
        if args.kid or args.precision_recall:
            raise ValueError("--kid and --precision-recall need reference images: give --real as an image folder or a dataset")
        real_stats = FeatureStats.load(args.real)
    elif (dataset := reference_dataset(args.real)) is not None:
        identity, real_images = dataset
    else:
        real_paths = list_images(args.real)
        identity = folder_identity(args.real, real_paths)
    fake_paths = list_images(args.fake) if args.fake is not None else None
    model = _load_model(args) if args.checkpoint else None
    inputs = _Inputs(real_stats, real_paths, real_images, fake_paths, model)
    if identity is not None:
        inputs.real_cache = _reference_cache_file(args, identity)
        cached = load_cached_stats(inputs.real_cache, inputs.n_real) if inputs.real_cache is not None else None
        # KID and precision/recall need the reference features themselves, which the cache does not hold
        if cached is not None and not (args.kid or args.precision_recall):
            inputs.real_stats, inputs.real_paths, inputs.real_images, inputs.cache_hit = cached, None, None, True
    if min(inputs.n_real, inputs.n_fake) < 2:
        raise ValueError(
            f"FID needs at least 2 images per set, got {inputs.n_real} reference and {inputs.n_fake} generated"
        )
    return inputs


def _reference_cache_file(args: argparse.Namespace, identity: Any) -> Path | None:
    """The automatic cache entry for the reference set's statistics, or ``None`` when not cached."""
    if args.no_stats_cache:
        return None
    key = reference_stats_key(identity, args.features, args.inception_weights, args.resize)
    if key is None:
        return None
    return Path(args.stats_cache or user_cache_dir() / "fid_stats") / f"{key}.npz"


def _write_cache(stats: FeatureStats, path: Path) -> None:
    """Cache the reference statistics; a cache that cannot be written only costs time, so it only warns."""
    try:
        stats.save(path)
    except OSError as err:
        print(f"difftune: warning: could not cache the reference statistics in {path}: {err}", file=sys.stderr)


def _plan(args: argparse.Namespace, inputs: _Inputs) -> str:
    if args.fake is not None:
        source = args.fake
    else:
        source = (
            f"{args.checkpoint} ({args.scheduler}, {args.steps} steps, guidance {args.guidance_scale:g}, "
            f"seeds {args.seed}..{args.seed + inputs.n_fake - 1})"
        )
    cache = f"; reference statistics cached in {inputs.real_cache}" if inputs.cache_hit else ""
    return (
        f"would score {inputs.n_fake} generated images from {source} against {inputs.n_real} reference images "
        f"({args.real}) with --features {args.features}{cache}"
    )


def cmd_eval_fid(args: argparse.Namespace) -> int:
    """``difftune eval fid``: print ``fid <value>`` (and KID, precision/recall); return the exit code."""
    _check_args(args)
    inputs = _resolve_inputs(args)
    if args.dry_run:
        print(_plan(args, inputs))
        return 0
    extractor = build_extractor(args.features, args.inception_weights)
    dim = getattr(extractor, "num_features", None)
    if inputs.real_stats is not None and isinstance(dim, int) and dim != inputs.real_stats.num_features:
        raise ValueError(
            f"{args.real}: feature dimension mismatch, file has {inputs.real_stats.num_features}, "
            f"--features {args.features} gives {dim}"
        )

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # as Accelerator does: without cpu=True a CPU-only torchrun launch is not seen as distributed
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise ValueError(
            f"launched {launched} processes but accelerate sees {state.num_processes}; "
            "on CPU set ACCELERATE_USE_CPU=1 (or use `accelerate launch --cpu`)"
        )
    work = _WorkDir(state, args.work_dir)
    try:
        _evaluate(args, inputs, extractor.to(state.device).eval(), state, work)
    except BaseException:
        work.close(wait=False)
        raise
    work.close()
    return 0


def _evaluate(args: argparse.Namespace, inputs: _Inputs, extractor: nn.Module, state: Any, work: _WorkDir) -> None:
    """Features of this process's share of the items, gathered on the main process, which reports."""
    rank, world, main, device = state.process_index, state.num_processes, state.is_main_process, state.device
    real_stats, real_feats = inputs.real_stats, None
    if inputs.cache_hit and main:
        print(f"reference statistics from the cache: {inputs.real_cache}", file=sys.stderr)
    if inputs.real_paths is not None or inputs.real_images is not None:
        n = inputs.n_real
        mine = list(range(rank, n, world))
        if inputs.real_paths is not None:
            batches = _folder_batches(inputs.real_paths, mine, args.batch_size, args.resize, args.workers)
        else:
            batches = _tensor_batches(inputs.real_images, mine, args.batch_size, args.resize)  # type: ignore[arg-type]
        idx, feats, _ = _run_extractor(
            _progress(batches, len(mine), args.batch_size, "reference features", main), extractor, device, False
        )
        gathered = work.gather("real", n, idx, feats, None, False)
        if gathered is not None:
            real_feats = gathered[0]
            real_stats = stats_from_features(real_feats)
            if inputs.real_cache is not None:
                _write_cache(real_stats, inputs.real_cache)
    if main and real_stats is not None and args.save_real_stats:
        real_stats.save(args.save_real_stats)

    mine = list(range(rank, inputs.n_fake, world))
    if inputs.fake_paths is not None:
        batches = _folder_batches(inputs.fake_paths, mine, args.batch_size, args.resize, args.workers)
        desc = "generated features"
    else:
        loaded, labels, scheduler = inputs.model  # type: ignore[misc]
        batches = _sample_batches(loaded, labels, mine, args, scheduler, device)
        desc = "sampling + features"
    keep = bool(args.export_npz)
    idx, feats, images = _run_extractor(
        _progress(batches, len(mine), args.batch_size, desc, main), extractor, device, keep
    )
    gathered = work.gather("fake", inputs.n_fake, idx, feats, images, keep)
    if gathered is not None:
        assert real_stats is not None
        _report(args, real_stats, real_feats, *gathered, world, device)


def _report(
    args: argparse.Namespace, real_stats: FeatureStats, real_feats: Tensor | None, fake_feats: Tensor,
    fake_images: Tensor | None, world: int, device: torch.device | str,
) -> None:
    """Main process: compute, print and save the metrics; export the generated images."""
    if fake_feats.shape[1] != real_stats.num_features:
        raise ValueError(
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
        results["precision"], results["recall"] = precision_recall(real_feats, fake_feats, args.pr_k, device=device)
    for key in ("fid", "kid", "kid_std", "precision", "recall"):
        if key in results:
            print(f"{key} {results[key]:.10g}")
    results.update(
        num_real=real_stats.count, num_fake=int(fake_feats.shape[0]), feature_dim=real_stats.num_features,
        num_processes=world,
    )
    if args.out_json:
        settings = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
        atomic_write_json(args.out_json, {**results, "settings": settings})


def add_eval_parser(subparsers: Any) -> None:
    """Register ``eval`` (with its ``fid`` sub-command) on the ``difftune`` sub-parsers."""
    p = subparsers.add_parser("eval", help="evaluate generated images (FID, KID, precision/recall)")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="{fid}")
    f = sub.add_parser(
        "fid", help="FID of generated images (a folder, or sampled from a checkpoint) against reference images",
        description="FID of generated images against reference images or cached statistics. Multi-process with "
        "`accelerate launch -m difftune eval fid ...` (sampling and features are split over the processes).",
    )
    f.add_argument(
        "--real", required=True,
        help="reference: image folder (PNG/JPEG, recursive), built-in dataset (digits or digits:5,6,7,8,9) "
        "or statistics .npz",
    )
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--fake", help="folder of generated images (PNG/JPEG, recursive)")
    src.add_argument("--checkpoint", help="model directory (or hub id) to sample from, as `difftune sample --model`")
    g = f.add_argument_group("sampling (with --checkpoint)")
    g.add_argument("--subfolder", help="model sub-folder (default: EMA weights if present, else transformer/unet)")
    g.add_argument("--no-ema", action="store_true", help="use the trained weights, not the EMA weights")
    g.add_argument("--vae", help="VAE hub id or directory for latent models (default: the model's own)")
    g.add_argument("--num-per-class", type=int, help="images per label (default 50: 50K for 1000 classes)")
    g.add_argument("--labels", help="comma-separated class labels (default: all classes)")
    g.add_argument("--scheduler", help="diffusers scheduler class name (default DPMSolverMultistepScheduler)")
    g.add_argument("--steps", type=int, help="sampling steps (default 25)")
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale, 1 = off (default 1.5)")
    g.add_argument("--seed", type=int, help="image i (label-major order) uses seed + i, as `difftune sample` (default 0)")
    g = f.add_argument_group("features and metrics")
    g.add_argument("--features", default="inception", help="inception (default), digits:PATH or module:function")
    g.add_argument("--inception-weights", help="local FID Inception weights (pt_inception-2015-12-05-*.pth)")
    g.add_argument("--save-real-stats", metavar="PATH.npz", help="write the reference statistics here for reuse")
    g.add_argument(
        "--stats-cache", metavar="DIR",
        help="where reference-set statistics are cached (default $XDG_CACHE_HOME/difftune/fid_stats)",
    )
    g.add_argument("--no-stats-cache", action="store_true", help="neither read nor write the statistics cache")
    g.add_argument("--kid", action="store_true", help="also KID (polynomial-kernel MMD over random subsets)")
    g.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    g.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size, capped at the set sizes")
    g.add_argument("--precision-recall", action="store_true", help="also k-NN precision/recall (O(N^2) distances)")
    g.add_argument("--pr-k", type=int, default=3, help="neighbourhood size k for precision/recall (default 3)")
    g = f.add_argument_group("input and output")
    g.add_argument("--resize", type=int, metavar="N", help="resize every image to NxN (PIL bicubic) before features")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass (does not change results)")
    g.add_argument("--workers", type=int, default=4, help="threads decoding image files")
    g.add_argument("--export-npz", metavar="PATH.npz", help="save the generated images as uint8 (N, H, W, 3) 'arr_0'")
    g.add_argument("--out-json", metavar="PATH", help="write the metrics and settings as JSON")
    g.add_argument("--work-dir", help="folder shared by the processes for partial results (default: a temp folder)")
    g.add_argument("--dry-run", action="store_true", help="validate the inputs and print the plan, do nothing")
    f.set_defaults(func=cmd_eval_fid)
