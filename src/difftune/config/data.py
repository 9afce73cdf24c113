"""The ``data`` section of the experiment config: which target images, their captions and control images."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from difftune.config.checks import _check, _check_fields

DataSource = Literal["folder", "captions", "hf_dataset", "digits", "photo_patches"]
# what data.path holds for each source (tests/test_config_renames.py checks it covers DataSource)
DATA_SOURCES = {
    "folder": "an image folder with one sub-directory per class",
    "captions": "an image folder with a metadata.jsonl of captions",
    "hf_dataset": "a directory written by datasets.Dataset.save_to_disk",
    "digits": "nothing (the built-in digits)",
    "photo_patches": "nothing (the built-in photo patches)",
}
BUILT_IN_SOURCES = ("digits", "photo_patches")


@dataclass
class BucketSettings:
    """``data.buckets``: aspect-ratio buckets (as kohya's sd-scripts, SimpleTuner and OneTrainer have them).

    Off by default: every image is resized and centre-cropped to a square. On, each image goes to the
    bucket (width x height) nearest its aspect ratio, is resized to cover it and centre-cropped (never
    stretched), and each training step takes its target rows, and its bank rows, from one bucket
    (docs/architecture.md, "Aspect-ratio buckets"). The buckets are those of kohya's
    ``make_bucket_resolutions`` at a budget of ``data.resolution``² pixels: every width from ``min_side``
    to ``max_side`` in steps of ``step`` with the tallest height (a multiple of ``step``, at most
    ``max_side``) that keeps within the budget, both ways round, and the square.

    Attributes:
        enabled: group the target images into buckets (needs ``data.resolution``, the budget's side).
        step: bucket sides are multiples of this (64 for Stable Diffusion: its VAE's 8 times the UNet's 8);
            it must be a multiple of the VAE's downsampling factor.
        min_side: the shortest bucket side; ``None``: half of ``data.resolution`` (rounded down to ``step``).
        max_side: the longest bucket side; ``None``: twice ``data.resolution``.
    """

    enabled: bool = False
    step: int = 64
    min_side: int | None = None
    max_side: int | None = None

    def sides(self, resolution: int) -> tuple[int, int]:
        """``(min_side, max_side)`` for a budget of ``resolution``² pixels, the defaults filled in."""
        low = (
            self.min_side
            if self.min_side is not None
            else max(self.step, resolution // 2 // self.step * self.step)
        )
        return low, self.max_side if self.max_side is not None else 2 * resolution


@dataclass
class DataConfig:
    """The target dataset.

    Attributes:
        source: ``"folder"`` (an image-folder tree: one sub-directory per class), ``"captions"``
            (an image folder with a ``metadata.jsonl`` of captions, the imagefolder convention of
            the ``datasets`` library), ``"hf_dataset"`` (a dataset saved with
            ``datasets.Dataset.save_to_disk``), ``"digits"`` (scikit-learn's handwritten digits,
            used by the demo) or ``"photo_patches"`` (grayscale patches of the photographs bundled
            with scikit-image and scikit-learn, cut at the model's size; the second test bed's source).
        path: root of the image folder or saved dataset.
        classes: digit classes (``source: digits``) or photo indices (``photo_patches``) to keep;
            labels are re-indexed 0..K-1 (plus ``label_offset``).
        per_class: keep at most this many images per class (few-shot); ``None`` keeps all. For
            ``photo_patches``: the number of patches cut from each photo (default 1200).
        resolution: images are resized and centre-cropped to this size; ``None`` = model's size.
        cache_dir: where encoded latents are cached; default ``<output_dir>/target_cache``.
        hflip: also cache every image mirrored (DiT's random horizontal flip augmentation).
        seed: seed of the few-shot subset selection.
        on_bad_file: ``"error"`` (default): unreadable images and empty class folders stop the run,
            all named; ``"skip"``: they are left out, each with a warning.
        caption_column: the caption's column in ``metadata.jsonl`` or the saved dataset.
        image_column: the image's column of a saved dataset (``metadata.jsonl`` uses ``file_name``).
        caption_template: captions of a labelled dataset (``folder``, ``digits``) for a
            text-conditional model: ``{}`` is replaced by the class name.
        control_column: the column naming each image's control image (a file in ``metadata.jsonl``,
            an image in a saved dataset), for a ControlNet with precomputed conditions.
        annotator: compute each image's control image with this annotator (e.g. ``canny``) instead.
        label_offset: a class-conditional model sees the target's classes as label rows
            ``label_offset .. label_offset + K - 1`` instead of ``0 .. K - 1``: new classes take rows
            that the source's classes do not use (a task sequence sets it for each stage).
        label_names: the names of the label rows below ``label_offset``, for the saved model's
            ``class_names.json`` (``None``: ``label<i>``; a task sequence passes on the earlier names).
    """

    source: DataSource = "folder"
    path: str | None = None
    classes: list[int] | None = None
    per_class: int | None = None
    resolution: int | None = None
    cache_dir: str | None = None
    hflip: bool = False
    seed: int = 0
    on_bad_file: Literal["error", "skip"] = "error"
    caption_column: str = "text"
    image_column: str = "image"
    caption_template: str = "{}"
    control_column: str | None = None
    annotator: str | None = None
    label_offset: int = 0
    label_names: list[str] | None = None
    buckets: BucketSettings = field(default_factory=BucketSettings)

    def __post_init__(self) -> None:
        _check_fields(self, "data")
        _check_fields(self.buckets, "data.buckets")
        self._check_buckets()
        _check(
            self.source in BUILT_IN_SOURCES or bool(self.path),
            f"data.path is empty: set it to {DATA_SOURCES[self.source]}",
        )
        _check(
            "{}" in self.caption_template,
            f"data.caption_template={self.caption_template!r} must contain {{}} (the class name goes there)",
        )
        _check(
            self.control_column is None or self.annotator is None,
            "data.control_column and data.annotator are both set: take control images from the data or "
            "compute them, not both",
        )
        _check(
            self.per_class is None or self.per_class > 0, "data.per_class must be a positive integer or null"
        )
        _check(self.label_offset >= 0, f"data.label_offset={self.label_offset} must be >= 0")
        _check(
            self.label_names is None or len(self.label_names) == self.label_offset,
            f"data.label_names names {len(self.label_names or [])} rows, but data.label_offset="
            f"{self.label_offset} rows come before the target's: give one name per row, or leave it out",
        )
        _check(
            self.label_offset == 0 or self.source not in ("captions", "hf_dataset"),
            f"data.label_offset moves class labels, but data.source={self.source} has captions, not classes: "
            "leave data.label_offset at 0",
        )

    def _check_buckets(self) -> None:
        """Refuse bucket settings that cannot give buckets, each in one line."""
        b = self.buckets
        if not b.enabled:
            return
        _check(
            self.source not in BUILT_IN_SOURCES,
            f"data.buckets groups images by their own aspect ratio, and data.source={self.source} has only "
            "square images: use an image folder (folder, captions or hf_dataset), or set data.buckets.enabled=false",
        )
        _check(
            self.resolution is not None,
            "data.buckets needs data.resolution: the buckets hold data.resolution² pixels (e.g. 512 for SD 1.5)",
        )
        resolution = int(self.resolution or 0)
        _check(b.step > 0, f"data.buckets.step={b.step} must be a positive number of pixels (e.g. 64)")
        _check(
            resolution % b.step == 0,
            f"data.resolution={resolution} is not a multiple of data.buckets.step={b.step}: the pixel budget "
            f"is resolution², and bucket sides step by {b.step}; use e.g. {max(b.step, resolution // b.step * b.step)}",
        )
        low, high = b.sides(resolution)
        for name, side in (("min_side", low), ("max_side", high)):
            _check(
                side > 0 and side % b.step == 0,
                f"data.buckets.{name}={side} must be a positive multiple of data.buckets.step={b.step}",
            )
        _check(
            low <= resolution <= high,
            f"data.buckets.min_side={low} and max_side={high} must hold data.resolution={resolution} between them",
        )
        _check(
            self.control_column is None and self.annotator is None,
            "data.buckets is not supported with control images (data.control_column, data.annotator) yet: "
            "a ControlNet's control images are square; set data.buckets.enabled=false",
        )
