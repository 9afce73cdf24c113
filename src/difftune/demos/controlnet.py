"""The controllable demo: a ControlNet on edge maps of handwritten digits, plain vs Diff-Tuning vs
inverse-SNR weighting, measured by how soon generated digits follow their edges.

1. Pre-train a small pixel-space text-conditional UNet on the digits ("digit 3"), with a tiny CLIP
   text encoder built locally (cached after the first run).
2. Generate the ControlNet's knowledge bank: samples of that frozen model with their Canny edges.
3. Train a ControlNet (made from the UNet, which stays frozen) on a few digits per class and their
   Canny edges, once per method, from the same weights and with the same seed.
4. Every ``validate_every`` steps: generate fixed (prompt, edge map) pairs, take Canny edges of the
   images, and score them against the input edges (edge F1, MSE, SSIM); report each method's
   sudden-convergence step, change point and area under the 1 - edge F1 curve.

Writes ``results.json``, ``report.md`` and ``fidelity.png``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from difftune.backbones import load_pretrained
from difftune.bank import generate_bank
from difftune.bank.conditions import prepare_bank_conditions
from difftune.config.experiment import (
    BankConfig,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    section_from_dict,
)
from difftune.config.sampling import SamplingSpec
from difftune.control import read_fidelity
from difftune.control.report import fidelity_curve, format_table, plot_fidelity, summary_rows
from difftune.demos.digits import pretraining_config
from difftune.demos.report import environment
from difftune.demos.text_encoder import save_pixel_text_to_image
from difftune.io.atomic import atomic_write_json, atomic_write_text
from difftune.io.store import user_cache_dir
from difftune.process.schedulers import make_scheduler
from difftune.training.loop import Trainer

CAPTION = "digit {}"
METRIC = "edge_f1"  # analysed as 1 - edge F1


@dataclass
class ControlDemoSettings:
    """Every knob of the controllable demo (defaults: a few minutes per method on a 2-core CPU)."""

    out: Path = Path("demo_controlnet_out")
    cache_dir: Path | None = None
    seed: int = 0  # of the ControlNet's training, its data subset and the bank
    source_seed: int = 0  # of the source model's pre-training (shared by the seeds of a study)
    resolution: int = 16
    pretrain_steps: int = 1200
    pretrain_batch: int = 32
    pretrain_lr: float = 1e-3
    per_class: int = 30
    bank_samples: int = 200
    steps: int = 600
    batch: int = 32
    learning_rate: float = 1e-3  # ControlNet's 1e-5 is for SD scale; a tiny ControlNet needs more
    cfg_dropout: float = 0.5  # ControlNet's training drops half of the prompts
    validate_every: int = 50
    validation_samples: int = 40
    edge_tolerance: int = 0  # at 16x16 one pixel is 6% of the image
    sample_steps: int = 10
    threshold: float = 0.5  # of 1 - edge F1, for the sudden-convergence step
    methods: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "plain": {"target_schedule": "uniform", "bank_share": 0.0},
            "diff-tuning": {},
            "inverse-snr": {"target_schedule": "inverse_snr", "bank_share": 0.0},
        }
    )

    def source_key(self) -> str:
        """Cache key of the pre-trained source model."""
        fields = (
            self.source_seed,
            self.resolution,
            self.pretrain_steps,
            self.pretrain_batch,
            self.pretrain_lr,
        )
        return hashlib.sha256(repr(("control-v1", fields)).encode()).hexdigest()[:12]

    def source_root(self) -> Path:
        """Where the source model and its banks are cached."""
        return (self.cache_dir or user_cache_dir()) / f"demo-control-source-{self.source_key()}"

    def describe(self) -> str:
        """A human-readable plan."""
        return (
            f"pre-train a text-conditional UNet on {self.resolution}x{self.resolution} digits for "
            f"{self.pretrain_steps} steps (cached in {self.source_root()}); bank of {self.bank_samples} samples "
            f"with Canny edges; ControlNet on {self.per_class} digits per class for {self.steps} steps, batch "
            f"{self.batch}, lr {self.learning_rate:g}, methods {list(self.methods)}; edge fidelity every "
            f"{self.validate_every} steps on {self.validation_samples} pairs; outputs in {self.out}"
        )


def _source_pipeline(root: Path, s: ControlDemoSettings) -> Path:
    """A random-init pixel-space text-to-image pipeline (UNet, text encoder, tokenizer, schedule)."""
    return save_pixel_text_to_image(
        root / "init", s.source_seed, s.resolution, (16, 32), 12, make_scheduler()
    )


def _data(s: ControlDemoSettings, per_class: int | None) -> DataConfig:
    return DataConfig(
        source="digits",
        per_class=per_class,
        seed=s.seed,
        resolution=s.resolution,
        caption_template=CAPTION,
        annotator="canny",
    )


def _pretrain_source(s: ControlDemoSettings) -> Path:
    """Train the text-to-image source on all digits (or reuse the cached one); returns its directory."""
    root = s.source_root()
    final = root / "run" / "final"
    if (final / "ema" / "unet" / "config.json").is_file():
        return final
    data = _data(s, None)
    data.annotator = None  # the source model is not controlled
    init = _source_pipeline(root, s)
    cfg = pretraining_config(
        init, data, root / "run", s.pretrain_steps, s.pretrain_batch, s.pretrain_lr, s.source_seed
    )
    print("[demo controlnet] pre-training the text-to-image source on the digits (cached for next time)")
    return Trainer(cfg).train()


def _config(s: ControlDemoSettings, name: str, source: Path, bank: Path) -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(pretrained=str(source), subfolder="ema/unet", controlnet="from_unet"),
        data=_data(s, s.per_class),
        bank=BankConfig(
            path=str(bank),
            num_samples=s.bank_samples,
            sampling=SamplingSpec(steps=s.sample_steps, seed=s.seed),
        ),
        objective=section_from_dict("objective", {"cfg_dropout": s.cfg_dropout, **s.methods[name]}),
        train=TrainConfig(
            output_dir=str(s.out / "runs" / name),
            batch_size=s.batch,
            max_steps=s.steps,
            learning_rate=s.learning_rate,
            ema_decay=0.0,
            checkpoint_every=0,
            keep_checkpoints=1,
            log_every=25,
            seed=s.seed,
            sampling=SamplingSpec(steps=s.sample_steps),
            validation_every=s.validate_every,
            validation_samples=s.validation_samples,
            validation_prompts="empty",  # a digit's caption alone fixes most of its edges
            validation_edge_tolerance=s.edge_tolerance,
            overwrite=True,
        ),
    )


def _bank(s: ControlDemoSettings, source: Path) -> Path:
    """The ControlNet's bank: frozen-source samples of the digit prompts, with their Canny edges."""
    bank = s.source_root() / f"bank-{s.bank_samples}-{s.sample_steps}-seed{s.seed}"
    cfg = _config(s, next(iter(s.methods)), source, bank)
    loaded = load_pretrained(str(source), "ema/unet", controlnet="from_unet")
    prepare_bank_conditions(loaded, cfg)
    print(f"[demo controlnet] knowledge bank: {s.bank_samples} samples of the source with their edges")
    generate_bank(loaded, cfg.bank)
    return bank


def run_control_demo(s: ControlDemoSettings) -> dict[str, dict[str, Any]]:
    """Run the controllable demo; returns and writes ``results.json`` (method -> fidelity summary)."""
    start = time.time()
    s.out.mkdir(parents=True, exist_ok=True)
    source = _pretrain_source(s)
    bank = _bank(s, source)
    records, seconds_by_method = {}, {}
    for name in s.methods:
        print(f"[demo controlnet] training a ControlNet with {name}")
        began = time.time()
        Trainer(_config(s, name, source, bank)).train()
        seconds_by_method[name] = time.time() - began
        records[name] = read_fidelity(s.out / "runs" / name)
    curves = {name: fidelity_curve(name, rows, METRIC) for name, rows in records.items()}
    rows = summary_rows(curves, METRIC, s.threshold)
    results = {
        row["run"]: {**row, "seconds": seconds_by_method[row["run"]], "curve": records[row["run"]]}
        for row in rows
    }
    seconds = time.time() - start
    plot_fidelity(curves, rows, s.out / "fidelity.png")
    table = format_table(rows, METRIC, s.threshold)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}
    atomic_write_json(
        s.out / "run_info.json", {"settings": settings, "seconds": seconds, "environment": environment()}
    )
    atomic_write_text(s.out / "report.md", _report(table, s, seconds))
    atomic_write_json(s.out / "results.json", results)  # last: its presence marks a finished run
    print(
        f"\n{table}\n\nwrote {s.out / 'results.json'}, {s.out / 'report.md'}, {s.out / 'fidelity.png'} ({seconds:.0f} s)"
    )
    return results


def _report(table: str, s: ControlDemoSettings, seconds: float) -> str:
    return (
        "# Controllable demo: ControlNet on digit edge maps\n\n"
        f"{s.describe()}\n\n"
        "The curve is 1 - edge F1 between the Canny edges of generated digits and the input edges (lower is "
        "better). `converged at`: the first validation step from which it stays at or below the threshold; "
        "`change point`: the best split of the curve into two levels; `area`: the curve's mean level.\n\n"
        f"```\n{table}\n```\n\n"
        f"Total time: {seconds:.0f} s. Curves: `fidelity.png`.\n"
    )
