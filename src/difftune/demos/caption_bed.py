"""The text-to-image test bed: does a knowledge bank made from captions keep what a text-to-image model
knew while it learns a new instance, and does Diff-Tuning's weighting help it learn?

1. A small pixel-space text-to-image UNet (8x8 grey-scale, a tiny CLIP text encoder built locally) is
   pre-trained on rectified flow on captioned digits ("digit 3") and photo patches ("photo of moon").
2. It is fine-tuned, DreamBooth-style, on a few *rotated* digits captioned "sks digit 3": a new instance
   ("sks") of a class the model knows ("digit").
3. Methods: plain fine-tuning; Diff-Tuning with the bank made from the target captions (the frozen
   model's idea of "sks digit 3"); Diff-Tuning with the ``class_swap`` bank ("sks digit" -> "digit",
   the frozen model's digits); and DreamBooth's prior preservation (the ``class_swap`` bank, both
   sources uniform in time).
4. Scores (:mod:`difftune.demos.caption_scores`): the target FID (samples of "sks digit k" against held-out
   rotated digits) and the forgetting score (samples of "digit k" against the frozen model's samples of
   the same prompts from the same seeds; 0 = nothing forgotten), with the prior FID (samples of "digit k"
   against held-out upright digits) beside it.

Writes ``results.json`` (its presence marks a finished seed), ``run_info.json`` and ``samples_<method>.png``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from difftune.backbones import load_pretrained, load_trained
from difftune.bank import generate_bank
from difftune.bank.conditions import prepare_bank_conditions
from difftune.config.experiment import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    section_from_dict,
)
from difftune.config.sampling import SamplingSpec
from difftune.data.builtin import PHOTOS
from difftune.demos.caption_data import (
    CLASS_WORD,
    INSTANCE,
    SPLIT,
    SPLIT_SEED,
    TARGET_CAPTION,
    DigitSplit,
    write_source_data,
    write_target_pool,
)
from difftune.demos.caption_scores import CaptionScorer
from difftune.demos.digits import pretraining_config
from difftune.demos.report import environment
from difftune.demos.text_encoder import save_pixel_text_to_image
from difftune.io.atomic import atomic_write_json
from difftune.io.images import save_grid
from difftune.io.store import user_cache_dir
from difftune.process.schedulers import make_scheduler
from difftune.training.loop import Trainer

ANCHOR = "pre-trained (no tuning)"  # results.json's row of the frozen source model


@dataclass
class CaptionBedSettings:
    """Every knob of the text-to-image test bed (defaults: about 4 minutes per seed on a 2-core CPU)."""

    out: Path = Path("caption_bed_out")
    cache_dir: Path | None = None
    seed: int = 0  # of the fine-tuning, its few-shot subset and its banks
    source_seed: int = 0  # of the source model's pre-training (shared by the seeds of a study)
    patches_per_photo: int = 60
    pretrain_steps: int = 4000
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    per_class: int = 10  # rotated digits of each class in the target set
    bank_samples: int = 500
    finetune_steps: int = 600
    finetune_batch: int = 32
    finetune_lr: float = 3e-4
    ema_decay: float = 0.99
    eval_per_class: int = 60
    sample_steps: int = SamplingSpec.steps
    guidance_scale: float = SamplingSpec.guidance_scale
    classifier_steps: int = 2000
    methods: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "plain": {"target_schedule": "uniform", "bank_share": 0.0},
            "diff-tuning": {"bank_prompts": "captions"},
            "diff-tuning class_swap": {"bank_prompts": "class_swap"},
            "prior preservation": {
                "bank_prompts": "class_swap",
                "target_schedule": "uniform",
                "bank_schedule": "uniform",
            },
            # Diff-Tuning's ψ on the target, the class_swap bank replayed at every noise level
            "psi + prior preservation": {"bank_prompts": "class_swap", "bank_schedule": "uniform"},
        }
    )

    def source_key(self) -> str:
        """Cache key of the pre-trained source model."""
        fields = (
            self.source_seed,
            self.patches_per_photo,
            self.pretrain_steps,
            self.pretrain_batch,
            self.pretrain_lr,
            SPLIT_SEED,
            SPLIT,
        )
        return hashlib.sha256(repr(("caption-bed-v1", fields)).encode()).hexdigest()[:12]

    def source_root(self) -> Path:
        """Where the source model, its data and its banks are cached."""
        return (self.cache_dir or user_cache_dir()) / f"caption-bed-source-{self.source_key()}"

    @property
    def sampling(self) -> SamplingSpec:
        """How evaluation samples are drawn: the same seeds (from 10000) for every model."""
        return SamplingSpec(
            scheduler="FlowMatchEulerDiscreteScheduler",
            steps=self.sample_steps,
            guidance_scale=self.guidance_scale,
            seed=10_000,
        )

    def describe(self) -> str:
        """A human-readable plan."""
        return (
            f"pre-train a text-to-image UNet (rectified flow, 8x8) on captioned digits and {self.patches_per_photo} "
            f"patches of each of {len(PHOTOS)} photos for {self.pretrain_steps} steps (cached in "
            f"{self.source_root()}); fine-tune on {self.per_class} rotated digits per class captioned "
            f"'{TARGET_CAPTION.format(3)}' for {self.finetune_steps} steps, batch {self.finetune_batch}, methods "
            f"{list(self.methods)}; banks of {self.bank_samples} samples; scores on {self.eval_per_class} samples "
            f"per class; outputs in {self.out}"
        )


def pretrain_source(s: CaptionBedSettings, split: DigitSplit) -> Path:
    """Train the source model on its captioned images (or reuse the cached one); returns its directory."""
    root = s.source_root()
    final = root / "run" / "final"
    if (final / "ema" / "unet" / "config.json").is_file():
        return final
    data = DataConfig(
        source="captions", path=str(write_source_data(root, split, s.patches_per_photo, s.source_seed))
    )
    # rectified flow at shift 1 (8x8 needs none); attention at 4x4
    init = save_pixel_text_to_image(
        root / "init", s.source_seed, 8, (32, 64), 32, make_scheduler("flow", shift=1.0)
    )
    cfg = pretraining_config(
        init, data, root / "run", s.pretrain_steps, s.pretrain_batch, s.pretrain_lr, s.source_seed
    )
    print("[caption bed] pre-training the text-to-image source (cached for next time)")
    return Trainer(cfg).train()


def method_config(
    s: CaptionBedSettings, name: str, source: Path, pool: Path, bank_root: Path
) -> ExperimentConfig:
    """The fine-tuning run of method ``name``: its objective, and the bank its ``bank_prompts`` names."""
    spec = dict(s.methods[name])
    prompts = spec.pop("bank_prompts", "captions")
    return ExperimentConfig(
        model=ModelConfig(pretrained=str(source), subfolder="ema/unet"),
        data=DataConfig(
            source="folder",
            path=str(pool),
            per_class=s.per_class,
            seed=s.seed,
            caption_template=TARGET_CAPTION,
        ),
        bank=section_from_dict(
            "bank",
            {
                "path": str(bank_root / f"bank-{prompts}-{s.bank_samples}-seed{s.seed}"),
                "num_samples": s.bank_samples,
                "prompts": prompts,
                **(
                    {"class_swap": {"instance": INSTANCE, "class_word": CLASS_WORD}}
                    if prompts == "class_swap"
                    else {}
                ),
                "sampling": asdict(SamplingSpec(scheduler=s.sampling.scheduler, seed=s.seed)),
            },
        ),
        objective=section_from_dict("objective", spec),
        train=TrainConfig(
            output_dir=str(s.out / "runs" / name),
            batch_size=s.finetune_batch,
            max_steps=s.finetune_steps,
            learning_rate=s.finetune_lr,
            ema_decay=s.ema_decay,
            checkpoint_every=0,
            keep_checkpoints=1,
            log_every=50,
            seed=s.seed,
            overwrite=True,
        ),
    )


def make_bank(cfg: ExperimentConfig) -> None:
    """Generate ``cfg``'s bank from the frozen source (a finished bank is kept as it is)."""
    if cfg.objective.bank_share == 0:
        return
    loaded = load_pretrained(cfg.model.pretrained, cfg.model.subfolder)
    print(f"[caption bed] knowledge bank: {prepare_bank_conditions(loaded, cfg)}")
    generate_bank(loaded, cfg.bank)


def _recorded(s: CaptionBedSettings) -> dict[str, Any]:
    """The settings as ``run_info.json`` records them."""
    return json.loads(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}))


def earlier_results(s: CaptionBedSettings, anchor: dict[str, float]) -> dict[str, Any]:
    """The scores of the methods an earlier run in ``s.out`` made with the same settings and method
    specs, kept only if it scored the frozen model exactly as now (``anchor``: the same references,
    classifier and sampling seeds); ``{}`` otherwise. Adding a method then runs only that one."""
    results, info = s.out / "results.json", s.out / "run_info.json"
    if not (results.is_file() and info.is_file()):
        return {}
    old, old_settings = json.loads(results.read_text()), json.loads(info.read_text())["settings"]
    now = _recorded(s)
    if {k: v for k, v in old_settings.items() if k != "methods"} != {
        k: v for k, v in now.items() if k != "methods"
    }:
        return {}
    if old.get(ANCHOR) != anchor:
        print("[caption bed] the earlier run scored the frozen model differently: every method runs again")
        return {}
    return {n: old[n] for n in s.methods if n in old and old_settings["methods"].get(n) == now["methods"][n]}


def run_caption_bed(s: CaptionBedSettings) -> dict[str, Any]:
    """Run the test bed for one seed; returns and writes ``results.json``. Methods an earlier run of the
    same settings scored in ``s.out`` are kept (:func:`earlier_results`)."""
    start = time.time()
    s.out.mkdir(parents=True, exist_ok=True)
    split = DigitSplit.load()
    source = pretrain_source(s, split)
    pool = write_target_pool(s.source_root(), split)
    frozen = load_pretrained(str(source), "ema/unet")
    scorer = CaptionScorer.build(
        split, frozen, s.eval_per_class, s.sampling, s.classifier_steps, s.source_seed
    )
    results: dict[str, Any] = {ANCHOR: scorer.anchor}
    earlier = earlier_results(s, scorer.anchor)
    for name in s.methods:
        if name in earlier:
            print(f"[caption bed] {name}: scored by an earlier run of these settings (results.json)")
            results[name] = earlier[name]
            continue
        cfg = method_config(s, name, source, pool, s.source_root())
        make_bank(cfg)
        print(f"[caption bed] fine-tuning with {name}")
        final = load_trained(str(Trainer(cfg).train()))
        results[name], grid = scorer.score(final)
        save_grid(grid, s.out / f"samples_{name.replace(' ', '_')}.png", nrow=10, upscale=4)
    seconds = time.time() - start
    atomic_write_json(
        s.out / "run_info.json", {"settings": _recorded(s), "seconds": seconds, "environment": environment()}
    )
    atomic_write_json(s.out / "results.json", results)
    print(f"\n{'method':<26}{'target FID':>12}{'forgetting':>12}{'prior FID':>11}")
    for name, r in results.items():
        print(f"{name:<26}{r['target_fid']:>12.2f}{r['forgetting']:>12.2f}{r['prior_fid']:>11.2f}")
    print(f"\nwrote {s.out / 'results.json'} ({seconds:.0f} s)")
    return results
