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


def test_bf16_lora_sd3_with_gradient_checkpointing_on_gpu(tmp_path: Path) -> None:
    """The SD3.5 recipe's settings (LoRA, bf16, gradient checkpointing, an EMA) on a tiny SD3 on the GPU;
    stock diffusers loads the LoRA there."""
    from diffusers import StableDiffusion3Pipeline

    from difftune.bank.conditions import prepare_bank_conditions
    from difftune.testing.sd3 import save_sd3_pipeline
    from test_stable_diffusion import _caption_folder

    root = save_sd3_pipeline(tmp_path / "pipe")
    cfg = load_config(
        None,
        [
            f"model.pretrained={root}",
            "data.source=captions",
            f"data.path={_caption_folder(tmp_path / 'data', n=4)}",
            f"bank.path={tmp_path / 'bank'}",
            "bank.num_samples=4",
            "bank.sampling.steps=2",
            "tuning.method=lora",
            "objective.bank_share=0.5",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=3",
            "train.batch_size=4",
            "train.log_every=1",
            "train.ema_decay=0.5",
            "train.mixed_precision=bf16",
            "train.gradient_checkpointing=true",
        ],
    )
    loaded = load_pretrained(str(root))
    prepare_bank_conditions(loaded, cfg)  # the captions' embeddings, as `difftune bank` gives them
    generate_bank(loaded, cfg.bank, device="cuda")
    trainer = Trainer(cfg)
    assert trainer.accelerator.device.type == "cuda"
    final = trainer.train()
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(h["loss/total"])) for h in history)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(root)).to("cuda")
    pipe.load_lora_weights(str(final / "ema" / "adapter"))
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()
