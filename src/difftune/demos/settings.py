"""The digits demo's settings: every knob, and what each test bed's source model is."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune.config.data import DataConfig
from difftune.config.sampling import SamplingSpec
from difftune.data.builtin import PHOTOS
from difftune.data.targets import PATCH_FORMAT
from difftune.demos.sources import PROCESSES, SAMPLERS, model_folder
from difftune.errors import UserError
from difftune.io.store import user_cache_dir

SOURCE_CLASSES = [0, 1, 2, 3, 4]
TARGET_CLASSES = [5, 6, 7, 8, 9]
SOURCE_DATA = ("digits", "photo_patches")  # the two test beds' source domains
# ``difftune demo photos``: the second test bed, whose source model (the photo patches) is larger
# and more diverse than five digit classes and trains longer; everything after pre-training is the
# digits demo's.
PHOTO_TEST_BED: dict[str, Any] = {
    "source_data": "photo_patches",
    "pretrain_steps": 8000,
    "pretrain_batch": 128,
}


@dataclass
class DemoSettings:
    """Every knob of the demo; the defaults take about 11 minutes on a 2-core CPU (the source model is cached after the first run)."""

    out: Path = Path("demo_out")
    cache_dir: Path | None = None
    seed: int = 0
    source_seed: int | None = None  # seed of the source model's pre-training; None = ``seed``
    source_data: str = "digits"  # the source domain: "digits" (source_classes) or "photo_patches"
    process: str = "ddpm"  # the source model's forward process: "ddpm", "flow" or "edm" (demos/sources.py)
    source_classes: list[int] = field(default_factory=lambda: list(SOURCE_CLASSES))
    patches_per_photo: int = 1200  # source_data "photo_patches": patches cut from each bundled photo
    target_classes: list[int] = field(default_factory=lambda: list(TARGET_CLASSES))
    per_class: int = 20
    model_width: int = 32  # attention head dim (4 heads)
    model_layers: int = 4
    pretrain_steps: int = 2000
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    bank_samples: int = 500
    finetune_steps: int = 600
    finetune_batch: int = 32
    finetune_lr: float = 3e-4
    ema_decay: float = 0.99
    eval_every: int = 200
    eval_per_class: int = 60
    sample_steps: int = SamplingSpec.steps
    guidance_scale: float = SamplingSpec.guidance_scale
    classifier_steps: int = 1500
    forgetting_method: str | None = None  # run the chain-of-forgetting probes on this method's model
    domain_guidance: bool = False  # also score each final model with the source model as its guide
    forgetting_fractions: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    methods: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "plain": {"target_schedule": "uniform", "bank_share": 0.0},
            "diff-tuning": {},
        }
    )

    def __post_init__(self) -> None:
        if self.source_data not in SOURCE_DATA:
            raise UserError(f"source_data={self.source_data!r} is unknown: use one of {list(SOURCE_DATA)}")
        if self.process not in PROCESSES:
            raise UserError(f"process={self.process!r} is unknown: use one of {list(PROCESSES)}")

    def source_key(self) -> str:
        """Cache key of the pre-trained source model (changes with anything that changes it)."""
        fields = (
            self.pretrain_seed,
            tuple(self.source_classes),
            self.model_width,
            self.model_layers,
            self.pretrain_steps,
            self.pretrain_batch,
            self.pretrain_lr,
        )
        if self.source_data != "digits":  # the digits source keeps the key it always had
            fields = (*fields, self.source_data, self.patches_per_photo, PATCH_FORMAT)
        if self.process != "ddpm":  # so does the DDPM source
            fields = (*fields, self.process)
        return hashlib.sha256(repr(("v2", fields)).encode()).hexdigest()[:12]

    def source_description(self) -> str:
        """The source domain in words."""
        if self.source_data == "photo_patches":
            return f"{self.patches_per_photo} 8x8 patches of each of {len(PHOTOS)} bundled photographs"
        return f"digits {self.source_classes}"

    def source_data_config(self) -> DataConfig:
        """The source model's pre-training data."""
        if self.source_data == "photo_patches":
            return DataConfig(
                source="photo_patches", per_class=self.patches_per_photo, seed=self.pretrain_seed
            )
        return DataConfig(source="digits", classes=self.source_classes, seed=self.pretrain_seed)

    @property
    def source_class_count(self) -> int:
        """Classes of the source model (target labels reuse its first embeddings)."""
        return len(PHOTOS) if self.source_data == "photo_patches" else len(self.source_classes)

    @property
    def pretrain_seed(self) -> int:
        """Seed of the source model's pre-training."""
        return self.seed if self.source_seed is None else self.source_seed

    @property
    def model_folder(self) -> str:
        """The subfolder of the source model's directory that holds the denoiser."""
        return model_folder(self.process)

    @property
    def sampler(self) -> str:
        """The scheduler class that samples this demo's models (:data:`~difftune.demos.sources.SAMPLERS`)."""
        return SAMPLERS[self.process]

    @property
    def sampling(self) -> SamplingSpec:
        """How evaluation samples are drawn: the same seeds (from 10000) for every model."""
        return SamplingSpec(
            scheduler=self.sampler, steps=self.sample_steps, guidance_scale=self.guidance_scale, seed=10_000
        )

    def resolved_cache(self) -> Path:
        """The cache directory (default ``$XDG_CACHE_HOME/difftune`` or ``~/.cache/difftune``)."""
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        return user_cache_dir()

    def architecture_description(self) -> str:
        """The source model and its process in words."""
        if self.process == "edm":
            return "an EDM-preconditioned UNet (40/80 channels)"
        model = f"a DiT (4 heads x {self.model_width}, {self.model_layers} layers)"
        return model if self.process == "ddpm" else f"{model} with rectified flow"

    def describe(self) -> str:
        """A human-readable plan."""
        return (
            f"pre-train {self.architecture_description()} on {self.source_description()} "
            f"for {self.pretrain_steps} steps (cached in {self.resolved_cache() / ('demo-source-' + self.source_key())}); "
            f"bank of {self.bank_samples} samples; fine-tune on {self.per_class} images per class of digits "
            f"{self.target_classes} for {self.finetune_steps} steps, batch {self.finetune_batch}, with methods "
            f"{list(self.methods)}; FID every {self.eval_every} steps on {self.eval_per_class} samples per class; "
            f"outputs in {self.out}"
        )
