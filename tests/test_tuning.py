"""Tuning methods: the registry, what trains, and saving the EMA when some parameters are frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from torch import nn

from difftune.backbones import load_pretrained, save_model
from difftune.config.experiment import ConfigError, TuningConfig, load_config
from difftune.training.loop import Trainer
from difftune.tuning import build_tuning, prepare_tuning, trainable_parameters

FROZEN = "pos_embed.proj.weight"  # a DiT parameter that the frozen-parameter tests keep fixed


class FreezeOne:
    """A tuning method for the tests: everything trains but one named parameter."""

    adapter = False

    def __init__(self, settings: object = None) -> None:
        self.settings = settings

    def prepare(self, model: nn.Module) -> list[nn.Parameter]:
        inner = getattr(model, "inner", model)
        inner.get_parameter(FROZEN).requires_grad_(False)
        return trainable_parameters(model)


def test_registry_fails_loudly_and_config_checks_the_name() -> None:
    with pytest.raises(ValueError, match=r"unknown tuning method 'lorra'; valid: \['adaptformer', 'bitfit'"):
        build_tuning("lorra")
    with pytest.raises(ConfigError, match=r"tuning.method='lorra' is unknown; valid: \['adaptformer'"):
        TuningConfig(method="lorra")
    assert TuningConfig().method == "full"


def test_full_tuning_trains_every_parameter_in_module_order(dit_dir: Path) -> None:
    backbone = load_pretrained(str(dit_dir)).backbone
    params = prepare_tuning(backbone, "full")
    assert [id(p) for p in params] == [id(p) for p in backbone.parameters()]


def _ema_with_shift(params: list[nn.Parameter], shift: float) -> EMAModel:
    ema = EMAModel(params, decay=0.9)
    ema.shadow_params = [p.detach() + shift for p in params]
    return ema


def test_save_model_pairs_the_ema_with_trainable_parameters_only(dit_dir: Path, tmp_path: Path) -> None:
    loaded = load_pretrained(str(dit_dir))
    params = FreezeOne().prepare(loaded.backbone)
    frozen = loaded.backbone.inner.get_parameter(FROZEN).detach().clone()
    live = {k: v.clone() for k, v in loaded.backbone.inner.state_dict().items()}
    save_model(loaded, tmp_path / "saved", _ema_with_shift(params, 1.0))

    ema_weights = load_file(
        str(tmp_path / "saved" / "ema" / "transformer" / "diffusion_pytorch_model.safetensors")
    )
    names = [n for n, p in loaded.backbone.inner.named_parameters() if p.requires_grad]
    assert FROZEN not in names and len(names) == len(live) - 1
    assert torch.equal(ema_weights[FROZEN], frozen)  # a frozen parameter is saved as it is
    for name in names:  # every trainable one is its own EMA average, not its neighbour's
        assert torch.equal(ema_weights[name], live[name] + 1.0), name
    for name, value in loaded.backbone.inner.state_dict().items():  # the live weights are restored
        assert torch.equal(value, live[name]), name


def test_save_model_refuses_an_ema_of_other_parameters(dit_dir: Path, tmp_path: Path) -> None:
    loaded = load_pretrained(str(dit_dir))
    ema = _ema_with_shift(list(loaded.backbone.parameters()), 0.0)  # built before freezing: one too many
    FreezeOne().prepare(loaded.backbone)
    with pytest.raises(ValueError, match="trainable parameters"):
        save_model(loaded, tmp_path / "saved", ema)
    assert not (tmp_path / "saved").exists()


def test_trainer_trains_only_what_the_method_names(dit_dir: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(
        None,
        [
            f"model.pretrained={dit_dir}",
            "tuning.method=test_tuning:FreezeOne",  # a user's method, by import path
            "data.source=digits",
            "data.classes=[5,6]",
            "data.per_class=4",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=3",
            "train.batch_size=4",
            "train.checkpoint_every=0",
            "train.ema_decay=0.5",
            "objective.bank_share=0",
            "train.learning_rate=1e-2",
        ],
    )
    before = load_pretrained(str(dit_dir)).backbone.inner.state_dict()
    final = Trainer(cfg).train()
    for sub in ("transformer", "ema/transformer"):
        after = load_file(str(final / sub / "diffusion_pytorch_model.safetensors"))
        assert torch.equal(after[FROZEN], before[FROZEN]), sub
        assert not torch.equal(after["proj_out_2.weight"], before["proj_out_2.weight"]), sub
