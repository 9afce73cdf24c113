"""The built-in demo: plain fine-tuning vs Diff-Tuning on scikit-learn's handwritten digits.

1. Pre-train a small pixel-space DiT on digits 0-4, or, on the second test bed
   (:data:`PHOTO_TEST_BED`), on patches of the photographs bundled with scikit-image and
   scikit-learn (cached after the first run).
2. Generate its knowledge bank.
3. Fine-tune on a few-shot target (digits 5-9) with plain fine-tuning and with Diff-Tuning, at equal
   steps and batch, from the same weights and with the same seed.
4. FID against held-out target digits on the features of a small digit classifier trained on other
   held-out digits, at every checkpoint (convergence curves) and at the end.

Writes ``results.json``, ``report.md``, ``curves.png`` and one sample grid per method.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from difftune.analysis.forgetting import save_swap_probe, save_transfer_gap, swap_probe, transfer_gap
from difftune.backbones import load_pretrained, load_trained
from difftune.backbones.loading import LoadedModel
from difftune.bank import generate_bank
from difftune.config.experiment import (
    BankConfig,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    ObjectiveConfig,
    TrainConfig,
    TuningConfig,
    section_from_dict,
)
from difftune.config.sampling import SamplingSpec
from difftune.demos.evaluation import DigitsEvaluator
from difftune.demos.report import environment, plot_curves, report_markdown, uniform_t_loss
from difftune.demos.settings import DemoSettings
from difftune.demos.sources import build_source_architecture
from difftune.io.atomic import atomic_write_json, atomic_write_text
from difftune.io.images import save_grid
from difftune.sampling.generate import build_scheduler, to_unit_range
from difftune.training.loop import Trainer, list_checkpoints


def pretraining_config(
    init: Path, data: DataConfig, run_dir: Path, steps: int, batch: int, learning_rate: float, seed: int
) -> ExperimentConfig:
    """A demo's source-model pre-training: plain training from the random-init model ``init`` with an
    EMA, one final checkpoint, resumable after an interruption."""
    return ExperimentConfig(
        model=ModelConfig(pretrained=str(init)),
        data=data,
        objective=ObjectiveConfig(target_schedule="uniform", bank_share=0.0),
        train=TrainConfig(
            output_dir=str(run_dir),
            batch_size=batch,
            max_steps=steps,
            learning_rate=learning_rate,
            ema_decay=0.999,
            checkpoint_every=0,
            keep_checkpoints=1,
            log_every=100,
            seed=seed,
            resume="latest",  # a pre-training killed after its checkpoint finishes from there
        ),
    )


def pretrain_source(s: DemoSettings) -> Path:
    """Train the source model on its source data (or reuse the cached one); returns its directory."""
    root = s.resolved_cache() / f"demo-source-{s.source_key()}"
    final = root / "run" / "final"
    if (final / "ema" / s.model_folder / "config.json").is_file():
        return final
    init = root / "init"
    architecture = build_source_architecture(
        s.process, s.source_class_count, s.model_width, s.model_layers, s.pretrain_seed
    )
    architecture.model.save_pretrained(init / architecture.folder)
    architecture.scheduler.save_pretrained(init / "scheduler")
    cfg = pretraining_config(
        init,
        s.source_data_config(),
        root / "run",
        s.pretrain_steps,
        s.pretrain_batch,
        s.pretrain_lr,
        s.pretrain_seed,
    )
    print(f"[demo] pre-training the source model on {s.source_description()} (cached for next time)")
    return Trainer(cfg).train()


@dataclass
class MethodSpec:
    """One method of the demo: objective overrides, plus which parameters train and how fast.

    A method's entry in :attr:`DemoSettings.methods` holds ``objective`` settings (``bank_share: 0``,
    ``power_up: {exponent: 0.5}``) and, optionally, ``tuning`` (the ``tuning`` section, e.g.
    ``{method: lora, lora: {rank: 4}}``, or only the method's name: ``tuning: lora``) and
    ``learning_rate`` (default: the demo's). Old spellings are upgraded with a deprecation line each
    (``target_exponent``; ``tuning_settings``, whose ``lora_rank`` and the like are the ``tuning`` section's).
    """

    objective: ObjectiveConfig
    model: ModelConfig
    tuning: TuningConfig
    learning_rate: float | None = None

    @classmethod
    def parse(cls, spec: dict[str, Any], source: str = "source", folder: str = "transformer") -> MethodSpec:
        """Validate one entry (raises ``ConfigError`` on an unknown field or value)."""
        rest = dict(spec)
        tuning = rest.pop("tuning", "full")
        tuning = {"method": tuning} if isinstance(tuning, str) else dict(tuning or {})
        tuning = section_from_dict("tuning", {**tuning, **rest.pop("tuning_settings", {})})
        learning_rate = rest.pop("learning_rate", None)
        model = ModelConfig(pretrained=source, subfolder=f"ema/{folder}")
        return cls(section_from_dict("objective", rest), model, tuning, learning_rate)


def _finetune(s: DemoSettings, name: str, source: Path, bank: Path) -> Path:
    method = MethodSpec.parse(s.methods[name], str(source), s.model_folder)
    cfg = ExperimentConfig(
        model=method.model,
        data=DataConfig(source="digits", classes=s.target_classes, per_class=s.per_class, seed=s.seed),
        bank=BankConfig(path=str(bank), num_samples=s.bank_samples),
        objective=method.objective,
        tuning=method.tuning,
        train=TrainConfig(
            output_dir=str(s.out / "runs" / name),
            batch_size=s.finetune_batch,
            max_steps=s.finetune_steps,
            learning_rate=method.learning_rate or s.finetune_lr,
            ema_decay=s.ema_decay,
            checkpoint_every=s.eval_every,
            keep_checkpoints=s.finetune_steps // s.eval_every + 1,
            log_every=25,
            seed=s.seed,
            overwrite=True,  # a new demo run replaces the previous one's fine-tuning runs
        ),
    )
    print(f"[demo] fine-tuning with {name}")
    Trainer(cfg).train()
    return Path(cfg.train.output_dir)


def _forgetting_probes(
    s: DemoSettings, evaluator: DigitsEvaluator, final: LoadedModel, source: LoadedModel
) -> None:
    """Swap probe (FID per hand-over fraction) and transfer-gap curve; JSON + PNG in ``s.out``."""
    print(f"[demo] chain-of-forgetting probes on the {s.forgetting_method} model")
    spec, backbone = s.sampling, final.backbone.eval()
    cond = backbone.condition(torch.arange(len(s.target_classes)).repeat_interleave(s.eval_per_class))
    swap = swap_probe(
        backbone,
        source.backbone.eval(),
        build_scheduler(
            spec.scheduler, final.scheduler_config, final.backbone.sample_shape, spec.scheduler_options
        ),
        cond,
        spec.seeds(0, cond.batch_size),
        lambda x: evaluator.fid(to_unit_range(x)),
        s.forgetting_fractions,
        spec.guidance_scale,
        spec.steps,
    )
    save_swap_probe(swap, s.out / "forgetting_swap.json")
    for axis, name in (("index", "forgetting_gap"), ("log_snr", "forgetting_gap_log_snr")):
        gap = transfer_gap(
            final.backbone,
            source.backbone,
            final.scheduler_config,
            evaluator.reference_images * 2 - 1,
            backbone.condition(evaluator.reference_labels),
            num_bins=10,
            draws_per_bin=4,
            seed=s.seed,
            axis=axis,
        )
        save_transfer_gap(gap, axis, s.out / f"{name}.json")


def run_demo(s: DemoSettings) -> dict[str, dict[str, Any]]:
    """Run the whole demo; returns and writes ``results.json`` (method name -> metrics)."""
    start = time.time()
    s.out.mkdir(parents=True, exist_ok=True)
    source = pretrain_source(s)
    source_model = load_pretrained(str(source), subfolder=f"ema/{s.model_folder}")
    bank = s.resolved_cache() / f"demo-source-{s.source_key()}" / f"bank-{s.bank_samples}-seed{s.seed}"
    print(f"[demo] knowledge bank: {s.bank_samples} samples of the source model")
    generate_bank(
        source_model,
        BankConfig(
            path=str(bank),
            num_samples=s.bank_samples,
            sampling=SamplingSpec(scheduler=s.sampler, seed=s.seed),
        ),
    )
    print("[demo] training the evaluation classifier on held-out digits")
    evaluator = DigitsEvaluator.build(s)
    results: dict[str, dict[str, Any]] = {
        "pre-trained (no tuning)": {"fid": evaluator.fid(evaluator.samples(source_model))}
    }
    for name in s.methods:
        run = _finetune(s, name, source, bank)
        curve = []
        for ckpt in list_checkpoints(run):  # the last one is the final model
            final = load_trained(str(ckpt / "model"))  # the EMA weights (or adapter)
            images = evaluator.samples(final)
            curve.append({"step": int(ckpt.name.split("-")[1]), "fid": evaluator.fid(images)})
        per_row = min(10, s.eval_per_class)
        grid = images.view(len(s.target_classes), s.eval_per_class, *images.shape[1:])[:, :per_row].flatten(
            0, 1
        )
        save_grid(grid, s.out / f"samples_{name}.png", nrow=per_row, upscale=4)
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        history = [h for h in logged if "loss/total" in h]  # training logs, not evaluations
        summary = json.loads((run / "run_summary.json").read_text())
        results[name] = {
            "trainable_parameters": summary["trainable_parameters"],
            "trainable_share": summary["trainable_share"],
            "fid": curve[-1]["fid"],
            "fid_curve": curve,
            **(
                {"fid_domain_guidance": evaluator.fid(evaluator.samples(final, guide=source_model.backbone))}
                if s.domain_guidance
                else {}
            ),
            "loss_curve": [{"step": h["step"], "loss": uniform_t_loss(h)} for h in history],
        }
    if s.forgetting_method is not None:
        final = load_trained(str(s.out / "runs" / s.forgetting_method / "final"))
        _forgetting_probes(s, evaluator, final, source_model)
    seconds = time.time() - start
    plot_curves(results, s.out)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}
    meta = {"settings": settings, "seconds": seconds, "environment": environment()}
    atomic_write_json(s.out / "run_info.json", meta)
    atomic_write_text(
        s.out / "report.md", report_markdown(results, s.describe(), seconds, s.source_data, s.process)
    )
    atomic_write_json(s.out / "results.json", results)  # last: its presence marks a finished run
    print(f"\n{'method':<26}{'FID':>10}")
    for name, r in results.items():
        print(f"{name:<26}{r['fid']:>10.2f}")
    print(
        f"\nwrote {s.out / 'results.json'}, {s.out / 'report.md'}, {s.out / 'curves.png'} ({seconds:.0f} s)"
    )
    return results
