"""The dry run's memory estimate: each part counted exactly, the activations traced on the meta device
equal to those of a real forward pass, and each setting moving the estimate the way it should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difftune.backbones.loading import load_pretrained, peek_backbone
from difftune.cli import main
from difftune.config.experiment import ExperimentConfig, load_config
from difftune.testing.models import save_sd_pipeline
from difftune.training.memory_estimate import FLOAT32, SavedActivations, estimate_training_memory
from difftune.tuning import build_tuning


def config(model: Path, tmp_path: Path, *extra: str) -> ExperimentConfig:
    return load_config(
        None,
        [
            f"model.pretrained={model}",
            "data.source=digits",
            "data.classes=[5,6,7,8,9]",
            f"train.output_dir={tmp_path / 'run'}",
            "train.batch_size=8",
            "objective.bank_share=0",
            *extra,
        ],
    )


def estimate(model: Path, tmp_path: Path, *extra: str, processes: int = 1):
    return estimate_training_memory(
        config(model, tmp_path, *extra), peek_backbone(str(model)), model, processes=processes
    )


def real_saved_bytes(model: Path, n: int) -> int:
    """Bytes autograd saves in one real forward pass of the model on CPU (float32)."""
    backbone = load_pretrained(str(model)).backbone
    build_tuning("full").prepare(backbone)
    counter = SavedActivations(backbone)
    backbone.train()
    with counter.hooks():
        backbone(
            torch.randn(n, *backbone.sample_shape),
            torch.randint(0, 1000, (n,)),
            backbone.unconditional(n),
        )
    return counter.total


def test_full_tuning_counts_every_part_exactly(dit_dir: Path, tmp_path: Path):
    params = sum(p.numel() for p in load_pretrained(str(dit_dir)).backbone.parameters())
    found = estimate(dit_dir, tmp_path)
    assert found.trained == found.gradients == found.ema == params * FLOAT32
    assert found.optimizer == 2 * params * FLOAT32
    assert found.frozen == 0 and found.buckets == 0 and found.micro_batch == 8
    # the meta trace saves what a real forward pass saves
    assert found.activations == real_saved_bytes(dit_dir, 8)
    # the peak holds the larger of the gradients and the activations, not both
    held = 4 * params * FLOAT32 + found.components
    assert found.total == held + max(found.activations, found.gradients)


def test_settings_move_the_estimate(dit_dir: Path, tmp_path: Path):
    base = estimate(dit_dir, tmp_path)
    eight_bit = estimate(dit_dir, tmp_path, "train.optimizer=adamw_8bit")
    assert eight_bit.optimizer * 4 == base.optimizer
    assert estimate(dit_dir, tmp_path, "train.ema_decay=0").ema == 0
    bf16 = estimate(dit_dir, tmp_path, "train.mixed_precision=bf16")
    assert bf16.activations == base.activations // 2 and bf16.casts == base.trained // 2
    assert estimate(dit_dir, tmp_path, "train.gradient_checkpointing=true").activations < base.activations / 2
    double = estimate(dit_dir, tmp_path, "train.batch_size=16").activations
    assert double == pytest.approx(2 * base.activations, rel=0.02)  # in proportion: no weights among them
    split = estimate(dit_dir, tmp_path, "train.gradient_accumulation=2", processes=2)
    assert split.micro_batch == 2 and split.buckets == base.gradients
    # accumulated gradients are held through the next forward pass: both count
    assert split.total == sum(
        (split.trained, split.gradients, split.optimizer, split.ema, split.buckets, split.activations)
    )


def test_lora_trains_a_small_share_and_keeps_the_base_frozen(dit_dir: Path, tmp_path: Path):
    params = sum(p.numel() for p in load_pretrained(str(dit_dir)).backbone.parameters())
    lora = estimate(dit_dir, tmp_path, "tuning.method=lora")
    assert 0 < lora.trained < params * FLOAT32 / 4
    assert lora.frozen == params * FLOAT32  # the base's weights, none of them trained
    assert lora.optimizer == 2 * lora.trained


def test_latent_model_counts_its_vae_files(latent_dit_dir: Path, tmp_path: Path):
    vae_bytes = sum(f.stat().st_size for f in (latent_dit_dir / "vae").glob("*.safetensors"))
    assert estimate(latent_dit_dir, tmp_path).components == vae_bytes > 0


@pytest.mark.parametrize("controlnet", [False, True])
def test_text_models_are_traced(tmp_path: Path, controlnet: bool):
    sd = save_sd_pipeline(tmp_path / "sd", controlnet=controlnet)
    cfg = load_config(
        None,
        [
            f"model.pretrained={sd}",
            "data.source=captions",
            f"data.path={tmp_path}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.batch_size=4",
            "objective.bank_share=0",
        ],
    )
    found = estimate_training_memory(cfg, peek_backbone(str(sd)), sd)
    assert found.activations is not None and found.activations > 0
    encoder_files = [*(sd / "vae").glob("*.safetensors"), *(sd / "text_encoder").glob("*.safetensors")]
    assert found.components == sum(f.stat().st_size for f in encoder_files)
    if controlnet:  # the ControlNet trains; the UNet it steers is frozen
        assert found.frozen > 0 and found.trained > 0


def test_dry_run_prints_the_estimate(dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    args = [
        f"--set=model.pretrained={dit_dir}",
        "--set=data.source=digits",
        "--set=data.classes=[5,6,7,8,9]",
        f"--set=train.output_dir={tmp_path / 'run'}",
        "--set=objective.bank_share=0",
    ]
    assert main(["train", *args, "--dry-run"]) == 0
    memory = [line for line in capsys.readouterr().out.splitlines() if "memory" in line]
    assert len(memory) == 1 and "per process" in memory[0] and "activations" in memory[0]


def test_fsdp_divides_the_backbone_state_among_the_processes(dit_dir: Path, tmp_path: Path):
    model = load_pretrained(str(dit_dir)).backbone
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.inner.transformer_blocks]
    unit = max([sum(p.numel() for p in model.parameters()) - sum(blocks), *blocks])
    extra = ("train.mixed_precision=bf16", "train.batch_size=16")
    whole = estimate(dit_dir, tmp_path, *extra, processes=4)
    cfg = config(dit_dir, tmp_path, *extra)
    sharded = estimate_training_memory(cfg, peek_backbone(str(dit_dir)), dit_dir, processes=4, sharded=True)
    for part in ("trained", "gradients", "optimizer", "ema", "frozen"):
        assert getattr(sharded, part) == -(-getattr(whole, part) // 4), part
    assert sharded.buckets == sharded.casts == 0 and whole.buckets > 0 and whole.casts > 0
    assert (sharded.components, sharded.activations) == (whole.components, whole.activations)
    assert sharded.gathered == 2 * unit * 2 + unit * FLOAT32  # two bf16 units and one unit's fp32 gradients
    assert sharded.total < whole.total
    assert "sharded over 4" in sharded.line() and "gathered FSDP units" in sharded.line()


def test_dry_run_under_an_fsdp_launch_estimates_shards(
    dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets from an FSDP config
    monkeypatch.setenv("WORLD_SIZE", "8")
    args = [f"--set=model.pretrained={dit_dir}", "--set=data.source=digits", "--set=data.classes=[5,6,7,8,9]"]
    args.append("--set=objective.bank_share=0")
    assert main(["train", *args, f"--set=train.output_dir={tmp_path / 'run'}", "--dry-run"]) == 0
    memory = [line for line in capsys.readouterr().out.splitlines() if "memory" in line]
    assert len(memory) == 1 and "sharded over 8" in memory[0]
    # what the sharded run would refuse, the dry run refuses too
    assert (
        main(
            [
                "train",
                *args,
                f"--set=train.output_dir={tmp_path / 'run'}",
                "--set=train.compile=full",
                "--dry-run",
            ]
        )
        != 0
    )
    assert "train.compile=full is not supported with FSDP sharding yet" in capsys.readouterr().err


def test_saved_weights_are_not_counted_as_activations():
    layer = torch.nn.Linear(16, 32)
    counter = SavedActivations(layer)
    x = torch.randn(4, 16, requires_grad=True)
    with counter.hooks():
        torch.nn.functional.gelu(layer(x))
    # the linear layer saves its input (4x16) and its transposed weight (not counted); GELU its input (4x32)
    assert counter.total == (4 * 16 + 4 * 32) * 4
