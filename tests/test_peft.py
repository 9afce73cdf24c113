"""Parameter-efficient tuning end to end: switching off, what trains, adapters saved, loaded, merged, resumed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import peft
import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file
from torch import nn

from difftune.backbones import (
    Backbone,
    Conditioning,
    apply_tuning,
    load_pretrained,
    load_trained,
    merged_model,
)
from difftune.backbones.adapters import load_adapter
from difftune.config.experiment import ConfigError
from difftune.config.tuning import AdaptFormerSettings, DiffFitSettings, LoraSettings
from difftune.errors import UserError
from difftune.testing.models import save_pipeline_dir, tiny_dit
from difftune.training.loop import Trainer
from difftune.tuning import TUNING_METHODS, TuningConfig, adapters_off, prepare_tuning, trainable_parameters
from difftune.tuning.size import check_adapter_size, full_ranks
from test_training import assert_all_equal, make_cfg

ADAPTER_METHODS = sorted(name for name in TUNING_METHODS if name != "full")
UNET_METHODS = ["bitfit", "difffit", "loha", "lokr", "lora", "svdiff"]  # the ones that need no DiT blocks
MERGEABLE = ["bitfit", "difffit", "loha", "lokr", "lora", "svdiff"]
REPARAMETRISING = ["bitfit", "difffit", "svdiff"]  # torch parametrizations rather than peft layers
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # the default LoRA targets of both backbones
TRAIN = ("train.learning_rate=1e-2", "train.ema_decay=0.5", "train.max_steps=2", "train.checkpoint_every=0")


def _inputs(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """A fixed batch of three noisy samples with their timesteps and labels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, *backbone.sample_shape), generator=g)
    return x, torch.tensor([10, 500, 990]), Conditioning({"labels": torch.tensor([0, 2, 4])})


@torch.no_grad()
def _output(backbone: Backbone) -> torch.Tensor:
    backbone.eval()
    return backbone(*_inputs(backbone))


@torch.no_grad()
def _perturb(params: list[nn.Parameter]) -> None:
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def _ids(params: list[nn.Parameter]) -> list[int]:
    return [id(p) for p in params]


def _ema_output(trainer: Trainer) -> torch.Tensor:
    """The output of the trained model with the EMA's averages swapped in (as save_model does)."""
    params = trainable_parameters(trainer.loaded.backbone)
    trainer.ema.store(params)
    trainer.ema.copy_to(params)
    try:
        return _output(trainer.loaded.backbone)
    finally:
        trainer.ema.restore(params)


def _train(pretrained: Path, out: Path, method: str, *extra: str) -> tuple[Trainer, Path]:
    trainer = Trainer(make_cfg(pretrained, out, None, f"tuning.method={method}", *TRAIN, *extra))
    return trainer, trainer.train()


def _lora_layers(model: nn.Module) -> list[nn.Linear]:
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and any(name == t or name.endswith("." + t) for t in ATTENTION_PROJECTIONS)
    ]


@pytest.mark.parametrize(
    ("kind", "method"),
    [("dit", m) for m in ADAPTER_METHODS] + [("unet", m) for m in UNET_METHODS],
)
def test_switched_off_is_the_pretrained_model(kind: str, method: str, request: pytest.FixtureRequest) -> None:
    backbone = load_pretrained(str(request.getfixturevalue(f"{kind}_dir"))).backbone
    pretrained = _output(backbone)
    params = prepare_tuning(backbone, method)
    assert params and _ids(params) == _ids(trainable_parameters(backbone))
    if method == "vpt":  # the prompt tokens are random from the start, by design
        assert not torch.equal(_output(backbone), pretrained)
    else:  # every other method starts as an exact identity
        assert torch.equal(_output(backbone), pretrained)

    _perturb(params)
    flags = _flags(backbone)
    perturbed = _output(backbone)
    assert (perturbed - pretrained).abs().max() > 1e-4
    with adapters_off(backbone) as model:
        assert model is backbone
        assert torch.equal(_output(backbone), pretrained)
    assert torch.equal(_output(backbone), perturbed)
    assert _flags(backbone) == flags
    assert _ids(trainable_parameters(backbone)) == _ids(params)


@pytest.mark.parametrize(
    ("method", "needs"), [("adaptformer", "feed-forward blocks"), ("vpt", "transformer blocks")]
)
def test_transformer_only_methods_refuse_the_unet(unet_dir: Path, method: str, needs: str) -> None:
    backbone = load_pretrained(str(unet_dir)).backbone
    with pytest.raises(UserError, match=rf"tuning.method={method} needs {needs}, and UNet2DModel has none"):
        prepare_tuning(backbone, method)


def test_trainable_counts_and_run_summary(dit_dir: Path, tmp_path: Path) -> None:
    base = load_pretrained(str(dit_dir)).backbone.inner
    n_base = sum(p.numel() for p in base.parameters())
    targeted = _lora_layers(base)
    assert len(targeted) == 2 * 4  # two blocks, four attention projections each
    rank = 3
    expected = {
        "lora": sum(rank * (m.in_features + m.out_features) for m in targeted),
        "bitfit": sum(p.numel() for name, p in base.named_parameters() if name.split(".")[-1] == "bias"),
    }
    for method, count in expected.items():
        loaded = load_pretrained(str(dit_dir))
        params = apply_tuning(loaded, method, TuningConfig(lora=LoraSettings(rank=rank)))
        assert sum(p.numel() for p in params) == count, method

        run = tmp_path / method
        rank_setting = [f"tuning.lora.rank={rank}"] if method == "lora" else []  # bitfit refuses it
        _train(dit_dir, run, method, *rank_setting, "train.max_steps=1")
        summary = json.loads((run / "run_summary.json").read_text())
        assert summary["tuning"] == method
        assert summary["trainable_parameters"] == count, method
        # the share counts the added parameters in the whole, as peft's print_trainable_parameters does
        assert summary["trainable_share"] == pytest.approx(count / (n_base + count), rel=1e-12), method


def test_a_lora_rank_above_every_layers_full_rank_is_refused(dit_dir: Path, tmp_path: Path) -> None:
    # the tiny DiT's attention projections are 16 x 16: rank 16 is their full rank, 17 adds nothing
    run = tmp_path / "run"
    with pytest.raises(UserError) as info:
        Trainer(make_cfg(dit_dir, run, None, "tuning.method=loha", "tuning.lora.rank=17"))
    assert str(info.value) == (
        "tuning.lora.rank=17 is above the full rank min(in, out) of every layer tuning.method=loha adapts "
        "(at most 16), so it adds parameters and no capacity; set tuning.lora.rank to at most 16"
    )
    assert not run.exists()  # refused before anything is written
    Trainer(make_cfg(dit_dir, run, None, "tuning.method=lora", "tuning.lora.rank=16"))


def test_a_lora_rank_above_some_layers_full_rank_is_reported(
    dit_dir: Path, unet_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loaded = load_pretrained(str(dit_dir))
    settings = TuningConfig(
        lora=LoraSettings(rank=12, targets=["to_q", "proj_out_2"])
    )  # 16 x 16 twice, 8 x 16
    apply_tuning(loaded, "lora", settings)
    assert full_ranks(loaded.backbone) == [16, 16, 8]
    with caplog.at_level(logging.WARNING):
        check_adapter_size("lora", settings, loaded.backbone)
    assert [r.getMessage() for r in caplog.records] == [
        "tuning.lora.rank=12 is above the full rank min(in, out) of 1 of the 3 layers tuning.method=lora "
        "adapts (down to 8): there it adds parameters and no capacity"
    ]
    loaded = load_pretrained(str(unet_dir))  # a convolution's full rank: min(out, in x kernel)
    apply_tuning(
        loaded,
        "lora",
        TuningConfig(lora=LoraSettings(targets=["conv_in", "down_blocks.1.resnets.0.conv_shortcut"])),
    )
    assert full_ranks(loaded.backbone) == [min(8, 1 * 3 * 3), min(16, 8 * 1 * 1)]


def test_an_adapter_larger_than_half_the_model_is_reported(
    dit_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n_base = sum(p.numel() for p in load_pretrained(str(dit_dir)).backbone.parameters())
    for dim, warned in ((64, False), (300, True)):  # 4,256 and 19,832 parameters beside the base's
        loaded = load_pretrained(str(dit_dir))
        settings = TuningConfig(adaptformer=AdaptFormerSettings(dim=dim))
        n = sum(p.numel() for p in apply_tuning(loaded, "adaptformer", settings))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            check_adapter_size("adaptformer", settings, loaded.backbone)
        expected = [
            f"tuning.method=adaptformer trains {n:,} parameters, {100 * n / n_base:.0f}% of the base model's "
            f"{n_base:,} (which full fine-tuning, tuning.method=full, trains): not parameter-efficient; lower "
            "tuning.adaptformer.dim (now 300) or train in full"
        ]
        assert [r.getMessage() for r in caplog.records] == (expected if warned else []), dim
    check_adapter_size("full", TuningConfig(), load_pretrained(str(dit_dir)).backbone)  # nothing to check


@pytest.mark.parametrize(
    ("kind", "method"),
    [("dit", m) for m in ADAPTER_METHODS] + [("unet", m) for m in UNET_METHODS],
)
def test_adapter_round_trip_is_exact(
    kind: str, method: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pretrained_dir = request.getfixturevalue(f"{kind}_dir")
    base = load_pretrained(str(pretrained_dir)).backbone
    pretrained = _output(base)
    trainer, final = _train(pretrained_dir, tmp_path / "run", method)
    assert (final / "adapter").is_dir() and (final / "ema" / "adapter").is_dir()
    assert not (final / base.subfolder).exists() and not (final / "ema" / base.subfolder).exists()

    live = _output(trainer.loaded.backbone)
    ema = _ema_output(trainer)
    assert (live - pretrained).abs().max() > 1e-4  # the adapter trained
    assert not torch.equal(live, ema)
    assert torch.equal(_output(load_trained(str(final)).backbone), ema)
    assert torch.equal(_output(load_trained(str(final), use_ema=False).backbone), live)


def test_adapter_refuses_another_base(dit_dir: Path, tmp_path: Path) -> None:
    _, final = _train(dit_dir, tmp_path / "run", "lora")
    other = save_pipeline_dir(tmp_path / "other", tiny_dit(seed=1), "transformer")
    with pytest.raises(UserError, match="fingerprint"):
        load_adapter(final / "adapter", base=load_pretrained(str(other)))


def test_stock_peft_loads_the_lora_adapter(dit_dir: Path, tmp_path: Path) -> None:
    _, final = _train(dit_dir, tmp_path / "run", "lora")
    ours = load_trained(str(final), use_ema=False).backbone
    base = DiTTransformer2DModel.from_pretrained(dit_dir, subfolder="transformer")
    stock = peft.PeftModel.from_pretrained(base, str(final / "adapter")).eval()
    x, t, cond = _inputs(ours)
    with torch.no_grad():
        expected = _output(ours)
        got = stock(x, timestep=t, class_labels=cond["labels"]).sample
    assert torch.equal(got, expected)
    assert not torch.equal(expected, _output(load_pretrained(str(dit_dir)).backbone))


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_model_loads_in_stock_diffusers(method: str, dit_dir: Path, tmp_path: Path) -> None:
    pretrained = _output(load_pretrained(str(dit_dir)).backbone)
    loaded = load_pretrained(str(dit_dir))
    _perturb(apply_tuning(loaded, method))
    adapted = _output(loaded.backbone)

    merged_model(loaded.backbone.inner).save_pretrained(tmp_path / "merged")
    saved = load_file(str(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(dit_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == base.keys()  # the stock model's weight names, nothing added

    stock = DiTTransformer2DModel.from_pretrained(tmp_path / "merged").eval()
    x, t, cond = _inputs(loaded.backbone)
    with torch.no_grad():
        got = stock(x, timestep=t, class_labels=cond["labels"]).sample
    print(f"merge {method}: max |merged - adapted| = {(got - adapted).abs().max().item():.3g}")
    torch.testing.assert_close(got, adapted, atol=1e-5, rtol=1e-5)
    if method in REPARAMETRISING:  # the merged weights are the very values the parametrisations computed
        assert torch.equal(got, adapted)
    assert (got - pretrained).abs().max() > 1e-3


@pytest.mark.parametrize("method", MERGEABLE)
def test_merging_leaves_the_tuned_model_as_it_was(method: str, dit_dir: Path) -> None:
    loaded = load_pretrained(str(dit_dir))
    params = apply_tuning(loaded, method)
    _perturb(params)
    adapted = _output(loaded.backbone)
    merged_model(loaded.backbone.inner)
    assert torch.equal(_output(loaded.backbone), adapted)
    assert _ids(trainable_parameters(loaded.backbone)) == _ids(params)


@pytest.mark.parametrize("method", ["adaptformer", "vpt"])
def test_added_modules_cannot_be_merged(method: str, dit_dir: Path) -> None:
    loaded = load_pretrained(str(dit_dir))
    apply_tuning(loaded, method)
    with pytest.raises(UserError, match="cannot be merged"):
        merged_model(loaded.backbone.inner)


@pytest.mark.parametrize("dropout", [0.0, 0.2])  # with dropout, the resumed run must restore the RNG too
def test_lora_resume_is_exact(dropout: float, dit_dir: Path, tmp_path: Path) -> None:
    common = (
        "tuning.method=lora",
        f"tuning.lora.dropout={dropout}",
        "train.learning_rate=1e-2",
        "train.ema_decay=0.5",
        "train.checkpoint_every=2",
    )
    final_a = Trainer(make_cfg(dit_dir, tmp_path / "a", None, *common, "train.max_steps=4")).train()
    Trainer(make_cfg(dit_dir, tmp_path / "b", None, *common, "train.max_steps=2")).train()
    resumed = Trainer(
        make_cfg(dit_dir, tmp_path / "b", None, *common, "train.max_steps=4", "train.resume=latest")
    )
    final_b = resumed.train()
    assert resumed.state.step == 4
    summary = json.loads((tmp_path / "b" / "run_summary.json").read_text())
    assert summary["resume_from"]["step"] == 2

    def adapter(model_dir: Path, sub: str = "adapter") -> dict[str, torch.Tensor]:
        return load_file(str(model_dir / sub / "difftune_adapter.safetensors"))

    for sub in ("adapter", "ema/adapter"):
        assert_all_equal(adapter(final_a, sub), adapter(final_b, sub))
    trained = adapter(final_a)
    assert any(k.endswith("lora_B.default.weight") and v.abs().max() > 0 for k, v in trained.items())
    halfway = adapter(tmp_path / "b" / "checkpoints" / "checkpoint-0000002" / "model")
    assert not all(torch.equal(halfway[k], trained[k]) for k in trained)  # steps 3-4 moved it further


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tuning.lora.rank=0", "tuning.lora.rank=0 must be > 0"),
        ("tuning.lora.targets=[]", "tuning.lora.targets="),
    ],
)
def test_config_refuses_empty_lora(override: str, message: str, dit_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        make_cfg(dit_dir, tmp_path / "run", None, "tuning.method=lora", override)


def test_methods_refuse_settings_that_do_not_fit_the_model(dit_dir: Path) -> None:
    backbone = load_pretrained(str(dit_dir)).backbone
    with pytest.raises(
        UserError, match=r"tuning.difffit.blocks=\[99\] names blocks \[99\], but the model has 2"
    ):
        prepare_tuning(backbone, "difffit", TuningConfig(difffit=DiffFitSettings(blocks=[99])))
    backbone = load_pretrained(str(dit_dir)).backbone
    with pytest.raises(UserError, match="tuning.lora.targets"):
        prepare_tuning(backbone, "lora", TuningConfig(lora=LoraSettings(targets=["no_such_layer"])))
