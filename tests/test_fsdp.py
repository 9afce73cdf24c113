"""Sharded training (FSDP2 through accelerate) on 2 CPU processes over gloo (tests/fsdp_worker.py).

What it shows: every parameter and EMA average is a shard (each process holds half the elements);
the weights equal a one-process run's up to float summation order; the saved model stays stock; the
checkpoint holds accelerate's per-process shards; and resuming from it gives the uninterrupted run's
weights exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file

from conftest import run_torchrun
from difftune.backbones import load_pretrained
from difftune.bank import generate_bank
from difftune.training.loop import Trainer
from test_training import TESTS, assert_same_training, make_cfg, overrides, weights


def _launch(result_dir: Path, args: list[str]) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(TESTS / "fsdp_worker.py"),
        str(result_dir),
        *args,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    run_torchrun(cmd, env, cwd=TESTS.parent)
    return [json.loads((result_dir / f"rank-{i}.json").read_text()) for i in (0, 1)]


def test_fsdp2_shards_matches_one_process_and_resumes_exactly(dit_dir: Path, tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    single_cfg = make_cfg(dit_dir, tmp_path / "single", bank)
    generate_bank(load_pretrained(str(dit_dir)), single_cfg.bank, progress=False)
    run = tmp_path / "fsdp"
    ranks = _launch(tmp_path / "ranks", overrides(dit_dir, run, bank))

    for rank in ranks:
        assert rank["distributed_type"].endswith("FSDP") and rank["num_processes"] == 2
        assert rank["sharded_parameters"] == rank["parameters"] and rank["ema_sharded"]
        # each process holds its half of every parameter (dim 0 split in two, rounded up on rank 0)
        assert rank["total_elements"] / 2 - 200 <= rank["local_elements"] <= rank["total_elements"] / 2 + 200
        assert "FSDPBasicTransformerBlock" in rank["wrapped"]
        assert "FSDPCombinedTimestepLabelEmbeddings" in rank["wrapped"]
    state = run / "checkpoints" / "checkpoint-0000002" / "state"
    assert (state / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert (state / "optimizer_0" / ".metadata").is_file()
    assert not (state / "model.safetensors").exists()

    single = Trainer(single_cfg).train()
    sharded = run / "final"
    assert_same_training(weights(single), weights(sharded), atol=1e-5, steps=4)
    torch.testing.assert_close(
        weights(single, "ema/transformer"), weights(sharded, "ema/transformer"), rtol=0, atol=1e-5
    )
    DiTTransformer2DModel.from_pretrained(sharded / "transformer")  # the saved model is stock

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-0000004")
    shutil.rmtree(resumed / "final")
    _launch(tmp_path / "ranks_resumed", [*overrides(dit_dir, resumed, bank), "train.resume=latest"])
    for sub in ("transformer", "ema/transformer"):
        uninterrupted, again = weights(sharded, sub), weights(resumed / "final", sub)
        assert uninterrupted.keys() == again.keys()
        for key in uninterrupted:
            assert torch.equal(uninterrupted[key], again[key]), (sub, key)


@pytest.mark.parametrize(
    ("tuning", "saved"),
    [("full", "transformer"), ("lora", "adapter")],
    ids=["full-frozen-copy-teacher", "lora-adapters-off-teacher"],
)
def test_fsdp2_distillation_matches_one_process(
    tuning: str, saved: str, dit_dir: Path, tmp_path: Path
) -> None:
    """Distillation under sharding: full fine-tuning distils from a whole frozen copy on every process,
    LoRA from the sharded model with its adapters switched off."""
    extra = (
        f"tuning.method={tuning}",
        "objective.kind=distillation",
        "objective.retention_data=target",
        "objective.bank_share=0.2",
        "train.checkpoint_every=0",
    )
    ranks = _launch(tmp_path / "ranks", overrides(dit_dir, tmp_path / "fsdp", None, *extra))
    assert all(rank["sharded_parameters"] == rank["parameters"] for rank in ranks)
    single = Trainer(make_cfg(dit_dir, tmp_path / "single", None, *extra)).train()
    sharded = tmp_path / "fsdp" / "final"
    if saved == "adapter":
        name = "adapter/difftune_adapter.safetensors"
        a, b = load_file(str(single / name)), load_file(str(sharded / name))
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    else:
        assert_same_training(weights(single), weights(sharded), atol=1e-5, steps=4)
