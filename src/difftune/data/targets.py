"""Target datasets, encoded once into the diffusion space and cached (never re-encoded per step).

Sources:
* ``folder``: an image-folder tree, one sub-directory per class (sorted names give labels 0..K-1);
* ``digits``: scikit-learn's 8x8 handwritten digits (ships with scikit-learn), for the demo;
* ``photo_patches``: patches of the photographs bundled with scikit-image and scikit-learn, the
  second test bed's source domain.

For latent-space models the cache keeps the VAE posterior's mean and std, and each training step
draws ``mean + std * noise`` afresh, as DiT's training does with ``latent_dist.sample()``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from difftune.backbones.conditioning import Conditioning
from difftune.backbones.loading import LoadedModel
from difftune.config.data import BUILT_IN_SOURCES, DataConfig
from difftune.data.buckets import (
    Bucket,
    BucketPlan,
    BucketRows,
    check_bucket_fit,
    check_bucket_model,
    plan_buckets,
)
from difftune.data.builtin import (
    PHOTOS,
    built_in_class_count,
    load_photo_patches,
    load_sklearn_digits,
)
from difftune.data.captions import caption_folder, saved_dataset
from difftune.data.conditions import target_conditions
from difftune.data.images import TargetImages
from difftune.data.target_cache import check_cache_dir, encode_and_cache
from difftune.errors import UserError
from difftune.io.images import (
    IMAGE_EXTENSIONS,
    check_images,
    image_files,
    image_size,
    load_cover_image,
    load_each,
)
from difftune.io.mapped import MappedRows, RowReader, index_rows, rows
from difftune.io.store import folder_identity

PATCHES_PER_PHOTO = 1200  # photo_patches without data.per_class
PATCH_FORMAT = 1  # changes when the patch cutting changes (PHOTOS, PATCH_SCALES)
HEADER_MEMO = "image_checks.json"  # beside a target cache: the header checks of its image folder
logger = logging.getLogger(__name__)


@dataclass
class TargetData:
    """The target set in the diffusion space, ready for training.

    Attributes:
        samples: posterior means (M, C, h, w) (the samples themselves in pixel space), in memory or
            memory-mapped (:class:`~difftune.io.mapped.MappedRows`).
        std: posterior standard deviations (M, C, h, w) (zeros in pixel space), the same way.
        cond: the samples' conditions (M).
        class_names: the name of each label row up to the last target class (``data.label_names``, or
            ``label<i>``, for the rows below ``data.label_offset``).
        buckets: with ``data.buckets``, the bucket of each part of ``samples`` and ``std``
            (:class:`~difftune.data.buckets.BucketRows`: the rows of bucket b follow those of bucket b - 1).
    """

    samples: torch.Tensor | MappedRows | BucketRows
    std: torch.Tensor | MappedRows | BucketRows
    cond: Conditioning
    class_names: list[str]
    buckets: list[Bucket] | None = None

    def __len__(self) -> int:
        return int(self.samples.shape[0])

    def draw(
        self, indices: torch.Tensor, generator: torch.Generator, read: RowReader | None = None
    ) -> torch.Tensor:
        """Samples ``indices``, each a fresh draw from its VAE posterior (the sample itself in pixel space).

        ``read(name, values, indices)`` reads the rows of ``samples`` and ``std`` (default: indexing;
        a run passes its prefetcher's).
        """
        read = read or index_rows
        mean, std = read("samples", self.samples, indices), read("std", self.std, indices)
        return mean + std * torch.randn(mean.shape, generator=generator)

    def subset(self, indices: torch.Tensor) -> TargetData:
        """The samples ``indices`` with their conditions (memory-mapped samples stay on disk)."""
        if self.buckets is not None:
            raise ValueError("a bucketed target set is not split (data.buckets refuses held-out images)")
        return TargetData(
            rows(self.samples, indices), rows(self.std, indices), self.cond.select(indices), self.class_names
        )


def load_digits_split(classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as (images (N, 1, 8, 8) in [-1, 1], original digit labels (N,))."""
    images, labels = load_sklearn_digits()
    images = images * 2.0 - 1.0
    if classes is not None:
        keep = torch.isin(labels, torch.tensor(classes))
        images, labels = images[keep], labels[keep]
    return images, labels


def few_shot_indices(labels: torch.Tensor, per_class: int | None, seed: int) -> torch.Tensor:
    """Indices of at most ``per_class`` samples of each label, chosen with ``seed`` (sorted)."""
    if per_class is None:
        return torch.arange(labels.shape[0])
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for value in labels.unique(sorted=True):
        idx = (labels == value).nonzero().flatten()
        chosen.append(idx[torch.randperm(idx.numel(), generator=g)[:per_class]])
    return torch.cat(chosen).sort().values


def class_folders(
    root: Path, on_bad_file: str, memo: Path | None = None
) -> tuple[list[Path], list[Path], list[int]]:
    """The class folders of ``root`` (sorted; hidden ones ignored), their usable image files and labels.

    Empty class folders and unreadable files are refused, all of them named in one line, or, with
    ``on_bad_file="skip"``, left out with a warning each (a skipped folder takes no label). Files are
    judged from their headers; ``memo`` keeps the verdicts (:func:`~difftune.io.images.check_images`).
    """
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(
            f"data.path {root} has no class sub-directories; put each class's images in its own folder"
        )
    found = {d: image_files(d) for d in class_dirs}
    bad = list(check_images([p for paths in found.values() for p in paths], memo).items())
    empty = [d for d in class_dirs if not [p for p in found[d] if p not in dict(bad)]]
    if (bad or empty) and on_bad_file == "error":
        problems = [f"{p.relative_to(root)} ({why})" for p, why in bad] + [
            f"{d.name}/ (no images)" for d in empty
        ]
        raise UserError(
            f"data.path {root}: {len(problems)} unusable ({'; '.join(problems[:5])}{'; ...' if len(problems) > 5 else ''}); "
            "remove or fix them, or set data.on_bad_file=skip"
        )
    for p, why in bad:
        logger.warning("skipping unreadable image %s (%s)", p, why)
    for d in empty:
        logger.warning("skipping class folder %s: no usable images", d)
    skipped = {p for p, _ in bad}
    class_dirs = [d for d in class_dirs if d not in empty]
    files, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        usable = [p for p in found[class_dir] if p not in skipped]
        files += usable
        labels += [label] * len(usable)
    if not files:
        raise UserError(f"data.path {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return class_dirs, files, labels


def load_target_images(
    cfg: DataConfig, resolution: int, channels: int, header_memo: Path | None = None
) -> TargetImages:
    """Load the target dataset described by ``cfg`` at ``resolution`` with ``channels`` channels.

    ``header_memo``: where an image folder's header checks are remembered between runs.
    """
    if cfg.source in BUILT_IN_SOURCES:
        return _offset(_built_in_images(cfg, resolution, channels), cfg.label_offset)
    if cfg.source in ("captions", "hf_dataset"):
        return _captioned_images(cfg, resolution, channels, header_memo)
    root = Path(cfg.path or "")
    if not root.is_dir():
        raise UserError(
            f"data.path {str(root)!r} is not a directory; point it at an image folder (one sub-directory per class)"
        )
    class_dirs, files, labels = class_folders(root, cfg.on_bad_file, header_memo)
    label_tensor = torch.tensor(labels)
    keep = few_shot_indices(label_tensor, cfg.per_class, cfg.seed)
    files = [files[i] for i in keep.tolist()]
    digest = hashlib.sha256(json.dumps(folder_identity(root, files)).encode()).hexdigest()[:16]
    identity = f"folder:{root.resolve()}:{digest}:{resolution}:{channels}"

    def sized(indices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return load_each(lambda i: load_cover_image(files[i], size, channels), indices)

    images = TargetImages(
        label_tensor[keep],
        [p.name for p in class_dirs],
        identity,
        lambda indices: sized(indices, (resolution, resolution)),
        sized=sized,
        sizes=lambda: [image_size(f) for f in files],
    )
    return _offset(images, cfg.label_offset)


def _offset(images: TargetImages, label_offset: int) -> TargetImages:
    """``images`` whose cache identity says that their conditions take label rows from ``label_offset``
    (the labels themselves stay 0..K-1: they index the class names)."""
    if label_offset:
        images.identity = f"{images.identity}:labels+{label_offset}"
    return images


def _built_in_images(cfg: DataConfig, resolution: int, channels: int) -> TargetImages:
    """A built-in set (``digits`` or ``photo_patches``), its ``classes`` re-indexed 0..K-1."""
    count = built_in_class_count(cfg.source)
    unknown = sorted(set(cfg.classes or []) - set(range(count)))
    if unknown:
        raise UserError(
            f"data.classes has {unknown}, which {cfg.source} does not have: use classes 0..{count - 1}"
        )
    if cfg.source == "digits":
        images, original_labels = load_digits_split()
        per_class, prefix = cfg.per_class, "digits"
    else:  # patches are cut at the model's size; per_class = patches per photo (drawn with the seed)
        images, original_labels = load_photo_patches(resolution, cfg.per_class or PATCHES_PER_PHOTO, cfg.seed)
        images = images * 2.0 - 1.0
        per_class, prefix = None, f"photo_patches:{PATCH_FORMAT}"
    if cfg.classes is not None:
        keep = torch.isin(original_labels, torch.tensor(cfg.classes))
        images, original_labels = images[keep], original_labels[keep]
    classes = sorted(original_labels.unique().tolist())
    labels = torch.searchsorted(torch.tensor(classes), original_labels)
    keep = few_shot_indices(labels, per_class, cfg.seed)
    images, labels = images[keep], labels[keep]
    if images.shape[-1] != resolution or channels != 1:
        images = torch.nn.functional.interpolate(
            images, size=resolution, mode="bilinear", align_corners=False
        )
        images = images.expand(-1, channels, -1, -1).contiguous()
    names = (
        [str(c) for c in classes] if cfg.source == "digits" else [Path(PHOTOS[c][1]).stem for c in classes]
    )
    identity = f"{prefix}:{classes}:{cfg.per_class}:{cfg.seed}:{resolution}:{channels}"
    return TargetImages(labels, names, identity, lambda idx: images[idx])


def _captioned_images(
    cfg: DataConfig, resolution: int, channels: int, header_memo: Path | None
) -> TargetImages:
    """A captioned set as :class:`TargetImages` (one class; ``per_class`` keeps that many images)."""
    data = caption_folder(cfg, header_memo) if cfg.source == "captions" else saved_dataset(cfg)
    keep = few_shot_indices(torch.zeros(len(data), dtype=torch.long), cfg.per_class, cfg.seed)
    chosen = keep.tolist()
    identity = f"{data.identity}:{cfg.per_class}:{cfg.seed}:{resolution}:{channels}"
    return TargetImages(
        torch.zeros(len(chosen), dtype=torch.long),
        [],  # no classes: each image has its own caption
        identity,
        lambda idx: data.images(keep[idx], resolution, channels),
        [data.captions[i] for i in chosen],
        (lambda idx, size: data.controls(keep[idx], size)) if data.has_controls else None,
        lambda idx, size: data.sized_images(keep[idx], size, channels),
        lambda: data.sizes(keep),
    )


def prepare_target(
    cfg: DataConfig,
    loaded: LoadedModel,
    cache_dir: str | Path,
    device: torch.device | str = "cpu",
    mapped: bool = False,
) -> TargetData:
    """Load the target set of ``cfg`` at the size the model's codec needs, encode it once and cache it.

    With ``mapped`` (training), the samples and their posterior std stay in the cache's files and are
    read a batch at a time (:class:`~difftune.io.mapped.MappedRows`).

    Raises:
        ValueError: the data does not fit the model (its conditions, or the encoded shape).
    """
    backbone, codec = loaded.backbone, loaded.codec
    resolution = cfg.resolution or codec.image_size(backbone.sample_shape)
    check_cache_dir(Path(cache_dir))  # before anything is written there
    images = load_target_images(
        cfg, resolution, codec.image_channels(backbone.sample_shape), Path(cache_dir) / HEADER_MEMO
    )
    if cfg.buckets.enabled:
        return _bucketed_target(cfg, loaded, images, resolution, Path(cache_dir), device, mapped)
    # the model's family makes the conditions (and checks the set before anything is encoded)
    conditions = target_conditions(cfg, loaded, images, resolution)
    cached = encode_and_cache(
        images,
        codec,
        cache_dir,
        codec.identity(resolution),
        cfg.hflip,
        device=device,
        conditions=conditions,
        mapped=mapped,
    )
    if tuple(cached["samples"].shape[1:]) != backbone.sample_shape:
        raise UserError(
            f"target data encodes to {tuple(cached['samples'].shape[1:])} but the model expects "
            f"{backbone.sample_shape}; set data.resolution to match the model"
        )
    cond = Conditioning({key: value for key, value in cached.items() if key not in ("samples", "std")})
    backbone.check_condition(cond)
    return TargetData(cached["samples"], cached["std"], cond, _label_names(cfg, images))


def _label_names(cfg: DataConfig, images: TargetImages) -> list[str]:
    """One name per label row: ``data.label_names`` (or ``label<i>``) below ``data.label_offset``, then the classes'."""
    return (cfg.label_names or [f"label{row}" for row in range(cfg.label_offset)]) + images.class_names


def target_buckets(cfg: DataConfig, images: TargetImages, resolution: int) -> BucketPlan:
    """The buckets of the images of ``cfg`` (``data.buckets``), from their files' headers.

    Raises:
        UserError: the set's images have no sizes of their own (a built-in set).
    """
    if images.sizes is None:
        raise UserError(f"data.buckets: data.source={cfg.source} has no image sizes of its own")
    return plan_buckets(images.image_sizes(), resolution, cfg.buckets)


def planned_buckets(cfg: DataConfig) -> BucketPlan:
    """The buckets of the images of ``cfg`` (``data.buckets``, which needs ``data.resolution``), from the
    files' headers alone: what ``difftune bank`` and ``train --dry-run`` report before anything is encoded."""
    resolution = int(cfg.resolution or 0)
    return target_buckets(cfg, load_target_images(cfg, resolution, 3), resolution)


def _bucketed_target(
    cfg: DataConfig,
    loaded: LoadedModel,
    images: TargetImages,
    resolution: int,
    cache_dir: Path,
    device: torch.device | str,
    mapped: bool,
) -> TargetData:
    """:func:`prepare_target` with ``data.buckets``: each bucket encoded and cached in a sub-folder of its
    own (``bucket-<W>x<H>``), whose manifest names the bucket and its settings (a changed setting re-encodes)."""
    backbone, codec = loaded.backbone, loaded.codec
    check_bucket_model(backbone, codec.downsample, cfg.buckets)
    plan = target_buckets(cfg, images, resolution)
    check_bucket_fit(backbone, plan.buckets, codec.downsample)
    settings = dataclasses.asdict(cfg.buckets) | {"resolution": resolution}
    samples, stds, conds = [], [], []
    for bucket, members in zip(plan.buckets, plan.members, strict=True):
        part = images.bucket(members, (bucket.width, bucket.height), json.dumps(settings, sort_keys=True))
        cached = encode_and_cache(
            part,
            codec,
            cache_dir / bucket.folder,
            codec.identity(resolution),
            cfg.hflip,
            device=device,
            conditions=target_conditions(cfg, loaded, part, resolution),
            mapped=mapped,
            record={"bucket": [bucket.width, bucket.height], "buckets": settings},
        )
        shape = bucket.sample_shape(backbone.sample_shape[0], codec.downsample)
        if tuple(cached["samples"].shape[1:]) != shape:
            raise UserError(
                f"the target's bucket {bucket.name} encodes to {tuple(cached['samples'].shape[1:])}, not "
                f"{shape}; check data.buckets.step against the model"
            )
        samples.append(cached.pop("samples"))
        stds.append(cached.pop("std"))
        conds.append(Conditioning(cached))
    cond = Conditioning.cat(conds)
    backbone.check_condition(cond)
    names = _label_names(cfg, images)
    return TargetData(BucketRows(samples), BucketRows(stds), cond, names, plan.buckets)
