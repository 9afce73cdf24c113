"""GPU checks (bf16 mixed precision, device placement); skipped without CUDA. Run: pytest -m gpu."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel

from difftune.backbones import load_pretrained
from difftune.bank import generate_bank
from difftune.config.experiment import load_config
from difftune.training.loop import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_diff_tuning_on_gpu(dit_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            f"model.pretrained={dit_dir}",
            "data.source=digits",
            "data.classes=[5,6,7,8,9]",
            "data.per_class=4",
            f"bank.path={tmp_path / 'bank'}",
            "bank.num_samples=16",
            "bank.sampling.steps=3",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=4",
            "train.batch_size=10",
            "train.log_every=1",
            "train.mixed_precision=bf16",
        ],
    )
    generate_bank(load_pretrained(str(dit_dir)), cfg.bank, device="cuda")
    trainer = Trainer(cfg)
    assert trainer.accelerator.device.type == "cuda"
    final = trainer.train()
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(h["loss/total"])) for h in history)
    before = DiTTransformer2DModel.from_pretrained(dit_dir, subfolder="transformer").state_dict()
    after = DiTTransformer2DModel.from_pretrained(final, subfolder="transformer").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
