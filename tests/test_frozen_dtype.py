"""``train.frozen_dtype``: a LoRA run's frozen base in bfloat16, its adapter in float32.

On a tiny random-init Stable Diffusion pipeline (nothing downloaded), through the CLI: the run trains with
the base in bfloat16 (samples during training included), resumes exactly, saves an adapter that diffusers'
``load_lora_weights`` reads, and its first loss is the float32 base's up to bfloat16 rounding. The dry
estimate counts the base at two bytes a parameter. Bad combinations are refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import reset_accelerate
from difftune.backbones import load_trained
from difftune.backbones.loading import peek_backbone
from difftune.cli import main
from difftune.config.experiment import config_from_dict
from difftune.errors import UserError
from difftune.testing.models import save_sd_pipeline
from difftune.training.frozen_precision import cast_frozen, check_frozen_dtype
from difftune.training.memory_estimate import estimate_training_memory
from test_sd_lora_layout import TIGHT, _inputs, _stock_unet

LORA = {"method": "lora", "lora": {"rank": 4, "alpha": 4.0}}


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def _raw(sd_dir: Path, captions: Path, out: Path, frozen_dtype: str, **train: object) -> dict:
    return {
        "model": {"pretrained": str(sd_dir)},
        "data": {"source": "captions", "path": str(captions), "cache_dir": str(out.parent / "cache")},
        "bank": {
            "path": str(out.parent / "bank"),
            "num_samples": 4,
            "sampling": {"steps": 2},
            "batch_size": 4,
        },
        "objective": {"bank_share": 0.5},
        "tuning": LORA,
        "train": {
            "output_dir": str(out),
            "batch_size": 4,
            "max_steps": 4,
            "checkpoint_every": 2,
            "log_every": 1,
            "learning_rate": 1e-2,
            "ema_decay": 0.5,
            "mixed_precision": "bf16",
            "frozen_dtype": frozen_dtype,
            "sample_every": 2,
            "sampling": {"steps": 2},
            **train,
        },
    }


def _run(raw: dict, path: Path, *extra: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return main(["train", "--config", str(path), *extra])


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss/total"] for row in rows if "loss/total" in row]


@pytest.fixture(scope="module")
def runs(sd_dir: Path, captions: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("frozen")
    raw = _raw(sd_dir, captions, root / "bf16", "bfloat16")
    raw["bank"]["path"] = str(root / "bank")
    assert main(["bank", "--config", str(_write(raw, root / "bank.yaml"))]) == 0
    out = {}
    try:  # bf16 runs in this process: accelerate's state is reset around them
        reset_accelerate()
        for name, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
            raw = _raw(sd_dir, captions, root / name, dtype)
            raw["bank"]["path"] = str(root / "bank")
            assert _run(raw, root / f"{name}.yaml") == 0
            out[name] = root / name
    finally:
        reset_accelerate()
    return out


def _write(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cast_frozen_leaves_the_trained_parameters_in_float32() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    trained = list(model[1].parameters())
    assert cast_frozen(model, trained, "bfloat16") == 12
    assert [p.dtype for p in model[0].parameters()] == [torch.bfloat16] * 2
    assert [p.dtype for p in model[1].parameters()] == [torch.float32] * 2
    assert cast_frozen(model, trained, "float32") == 0


def test_a_bf16_base_trains_close_to_the_float32_one(runs: dict[str, Path]) -> None:
    bf16, fp32 = _losses(runs["bf16"]), _losses(runs["fp32"])
    assert len(bf16) == len(fp32) == 4 and all(torch.isfinite(torch.tensor(bf16)))
    # the same batches, t and noise: autocast rounds the float32 base's weights to bfloat16 in the matrix
    # products anyway, so the runs differ only where float32 ops read frozen weights (norms, biases)
    assert bf16 == pytest.approx(fp32, rel=0.01)
    summaries = {name: json.loads((run / "run_summary.json").read_text()) for name, run in runs.items()}
    assert summaries["bf16"]["frozen_dtypes"] == ["bfloat16"] and summaries["fp32"]["frozen_dtypes"] == [
        "float32"
    ]
    assert sorted(p.name for p in (runs["bf16"] / "samples").iterdir())  # sampled during training
    adapter = load_file(str(runs["bf16"] / "final" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())


def test_a_bf16_base_resumes_exactly(
    runs: dict[str, Path], sd_dir: Path, captions: Path, tmp_path: Path, fresh_accelerate: None
) -> None:
    raw = _raw(sd_dir, captions, tmp_path / "resumed", "bfloat16", max_steps=2)
    raw["bank"]["path"] = str(runs["bf16"].parent / "bank")
    raw["data"]["cache_dir"] = str(runs["bf16"].parent / "cache")
    assert _run(raw, tmp_path / "a.yaml") == 0
    raw["train"]["max_steps"] = 4
    assert _run(raw, tmp_path / "b.yaml", "--set", "train.resume=latest") == 0
    whole = load_file(str(runs["bf16"] / "final" / "adapter" / "pytorch_lora_weights.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "final" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)


def test_stock_diffusers_loads_the_adapter_of_a_bf16_base(runs: dict[str, Path], sd_dir: Path) -> None:
    x, t, prompts = _inputs()
    with torch.no_grad():
        ours = load_trained(str(runs["bf16"] / "final")).backbone.inner.eval()(x, t, prompts).sample
    stock = _stock_unet(sd_dir, runs["bf16"] / "final" / "ema" / "adapter")
    torch.testing.assert_close(stock, ours, **TIGHT)
    assert (stock - _stock_unet(sd_dir, None)).abs().max() > 1e3 * TIGHT["atol"]  # the LoRA is on


def test_the_estimate_counts_a_bf16_base_at_two_bytes(sd_dir: Path, captions: Path, tmp_path: Path) -> None:
    def frozen_bytes(dtype: str) -> int:
        cfg = config_from_dict(_raw(sd_dir, captions, tmp_path / dtype, dtype))
        return estimate_training_memory(cfg, peek_backbone(str(sd_dir))).frozen

    assert frozen_bytes("bfloat16") * 2 == frozen_bytes("float32") > 0


def test_bad_combinations_are_refused_in_one_line(sd_dir: Path, captions: Path, tmp_path: Path) -> None:
    raw = _raw(sd_dir, captions, tmp_path / "run", "bfloat16")
    raw["train"]["mixed_precision"] = "no"
    with pytest.raises(UserError, match="train.frozen_dtype=bfloat16 runs under train.mixed_precision=bf16"):
        config_from_dict(raw)
    with pytest.raises(UserError, match="tuning.method=full has none"):
        check_frozen_dtype("bfloat16", "full", adapter=False)
    check_frozen_dtype("float32", "full", adapter=False)
