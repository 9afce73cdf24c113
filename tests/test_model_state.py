"""A checkpoint's model state: only what trains, loaded into the live model one tensor at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import save_file

from difftune.backbones import apply_tuning, load_pretrained
from difftune.errors import UserError
from difftune.training.loop import Trainer
from difftune.training.model_state import load_in_place
from difftune.training.state import load_ema_in_place
from difftune.tuning import trainable_parameters
from test_training import make_cfg


def state_keys(run: Path) -> list[str]:
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    with safe_open(str(checkpoint / "state" / "model.safetensors"), framework="pt") as f:
        return sorted(f.keys())


def test_an_adapter_checkpoint_holds_only_the_adapter(dit_dir: Path, tmp_path: Path) -> None:
    common = ("train.max_steps=2", "train.checkpoint_every=2")
    lora = Trainer(make_cfg(dit_dir, tmp_path / "lora", None, *common, "tuning.method=lora"))
    lora.train()
    full = Trainer(make_cfg(dit_dir, tmp_path / "full", None, *common))
    full.train()
    trainable = sorted(n for n, p in lora.backbone.named_parameters() if p.requires_grad)
    assert state_keys(tmp_path / "lora") == trainable and all("lora_" in n for n in trainable)
    assert state_keys(tmp_path / "full") == sorted(full.backbone.state_dict())  # full tuning: everything
    size = {
        name: sum(p.stat().st_size for p in (tmp_path / name).rglob("state/model.safetensors"))
        for name in ("lora", "full")
    }
    assert size["lora"] < size["full"] / 4


def lora_model(dit_dir: Path):
    loaded = load_pretrained(str(dit_dir))
    apply_tuning(loaded, "lora")
    return loaded.backbone


def test_load_in_place_reads_a_whole_model_file_and_a_trainable_one(dit_dir: Path, tmp_path: Path) -> None:
    model = lora_model(dit_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    saved = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(saved, str(tmp_path / "whole.safetensors"))  # a checkpoint from before: the whole model
    trainable = {n: saved[n] for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp_path / "trainable.safetensors"))
    for name, count in (("whole", len(saved)), ("trainable", len(trainable))):
        fresh = lora_model(dit_dir)
        ids = [id(p) for p in fresh.parameters()]
        assert load_in_place(fresh, tmp_path / f"{name}.safetensors") == count
        assert [id(p) for p in fresh.parameters()] == ids  # the live tensors were filled, none replaced
        for key, value in fresh.state_dict().items():
            if key in trainable or name == "whole":
                assert torch.equal(value, saved[key]), key


def test_load_in_place_refuses_what_does_not_fit(dit_dir: Path, tmp_path: Path) -> None:
    model = lora_model(dit_dir)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state = model.state_dict()
    cases = {
        "unknown": ({**{n: state[n] for n in names}, "extra.weight": torch.zeros(2)}, "does not have"),
        "shape": ({**{n: state[n] for n in names}, names[0]: torch.zeros(3)}, "has shape"),
        "missing": ({n: state[n].contiguous() for n in names[1:]}, "no value for 1 trainable"),
    }
    for name, (tensors, message) in cases.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(UserError, match=message):
            load_in_place(model, tmp_path / f"{name}.safetensors")
    with pytest.raises(UserError, match="missing"):
        load_in_place(model, tmp_path / "none.safetensors")


def test_the_ema_is_restored_into_its_own_tensors(dit_dir: Path, tmp_path: Path) -> None:
    params = trainable_parameters(lora_model(dit_dir))
    ema = EMAModel(params, decay=0.9)
    averages = [torch.randn_like(p) for p in params]
    save_file({f"{i:06d}": a for i, a in enumerate(averages)}, str(tmp_path / "ema.safetensors"))
    before = [id(p) for p in ema.shadow_params]
    load_ema_in_place(ema, tmp_path / "ema.safetensors")
    assert [id(p) for p in ema.shadow_params] == before
    assert all(torch.equal(p, a) for p, a in zip(ema.shadow_params, averages, strict=True))
    save_file({"000000": averages[0]}, str(tmp_path / "short.safetensors"))
    with pytest.raises(UserError, match="holds 1 averages"):
        load_ema_in_place(ema, tmp_path / "short.safetensors")
