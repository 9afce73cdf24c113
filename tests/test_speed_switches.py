"""The train section's schedules, trackers and speed switches: each runs, keeps the loss where it was,
saves stock weights, and is refused with one line where it cannot work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from diffusers.optimization import get_scheduler

from difftune.config.checks import ConfigError
from difftune.config.train import TrainConfig
from difftune.errors import UserError
from difftune.training import speed
from difftune.training.compile_check import compare_gradients
from difftune.training.loop import Trainer
from difftune.training.lr_schedule import LearningRateSchedule
from difftune.training.speed import attention_kernel, repeated_blocks
from test_training import make_cfg, metrics, weights

SCHEDULES = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


def losses(run: Path) -> list[float]:
    return [row["loss/total"] for row in metrics(run) if "loss/total" in row]


def train(dit_dir: Path, out: Path, *extra: str) -> Path:
    return Trainer(make_cfg(dit_dir, out, None, *extra)).train()


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_diffusers_scheduler_stepped_each_step(name: str):
    tc = TrainConfig(
        max_steps=20,
        learning_rate=3e-4,
        lr_scheduler=name,
        lr_warmup_steps=0 if name == "constant" else 5,
        lr_num_cycles=2,
        lr_power=2.0,
    )
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([param], lr=tc.learning_rate)
    stock = get_scheduler(
        name, optimizer, num_warmup_steps=tc.lr_warmup_steps, num_training_steps=20, num_cycles=2, power=2.0
    )
    schedule = LearningRateSchedule(tc)
    for step in range(20):
        # polynomial ends at 1e-7 in diffusers (absolute), here at 1e-7 x the rate: a difference below 1e-7
        assert schedule.rate(step) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-7), step
        optimizer.step()
        stock.step()


def test_warmup_rates_are_logged_and_applied(dit_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    train(dit_dir, run, "train.lr_scheduler=cosine", "train.lr_warmup_steps=2", "train.learning_rate=1e-3")
    logged = {row["step"]: row["lr"] for row in metrics(run) if "lr" in row}
    # the rate of step s is logged after it: warm-up 0, 0.5e-3, then cosine over the remaining 2 steps
    assert logged == pytest.approx({1: 0.0, 2: 0.5e-3, 3: 1e-3, 4: 0.5e-3})


def test_resumed_run_follows_the_same_schedule(dit_dir: Path, tmp_path: Path):
    args = ("train.lr_scheduler=linear", "train.lr_warmup_steps=1", "train.learning_rate=1e-3")
    straight = train(dit_dir, tmp_path / "straight", *args)
    cut = tmp_path / "cut"
    train(dit_dir, cut, *args, "train.max_steps=2")
    resumed = train(dit_dir, cut, *args, "train.resume=latest")
    a, b = weights(straight), weights(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_schedule_may_change_on_resume_but_optimiser_kind_may_not(dit_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    train(dit_dir, run, "train.max_steps=2")
    train(dit_dir, run, "train.resume=latest", "train.lr_scheduler=linear", "train.lr_warmup_steps=1")
    with pytest.raises(UserError, match="train.optimizer"):
        train(dit_dir, run, "train.resume=latest", "train.max_steps=6", "train.optimizer=adamw_fused")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["train.lr_warmup_steps=2"], "lr_warmup_steps=2 has no effect with train.lr_scheduler=constant"),
        (["train.lr_scheduler=linear", "train.lr_warmup_steps=4"], "below train.max_steps=4"),
        (["train.lr_scheduler=piecewise_constant"], "train.lr_scheduler"),
        (["train.optimizer=adamw_8bit", "train.on_non_finite=skip"], "use on_non_finite=stop"),
        (["train.compile=max"], "train.compile"),
        (["train.sdpa_backend=xformers"], "train.sdpa_backend"),
        (["train.report_to=neptune"], "train.report_to"),
    ],
)
def test_bad_settings_are_refused_in_one_line(dit_dir: Path, tmp_path: Path, extra: list[str], message: str):
    with pytest.raises(ConfigError, match=message) as err:
        make_cfg(dit_dir, tmp_path / "run", None, *extra)
    assert "\n" not in str(err.value)


def test_fused_adamw_trains_as_the_default_one(dit_dir: Path, tmp_path: Path):
    plain = train(dit_dir, tmp_path / "plain")
    fused = train(dit_dir, tmp_path / "fused", "train.optimizer=adamw_fused")
    a, b = weights(plain), weights(fused)
    # another kernel rounds differently: equal to float32 rounding over 4 steps, not bit for bit
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_8bit_adamw_without_bitsandbytes_names_the_install(dit_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        train(dit_dir, tmp_path / "run", "train.optimizer=adamw_8bit")


def test_8bit_adamw_trains_and_resumes_exactly(dit_dir: Path, tmp_path: Path):
    pytest.importorskip("bitsandbytes")
    plain = tmp_path / "plain"
    train(dit_dir, plain)
    straight = tmp_path / "straight"
    final = train(dit_dir, straight, "train.optimizer=adamw_8bit")
    assert losses(straight) == pytest.approx(losses(plain), rel=0.02)
    cut = tmp_path / "cut"
    train(dit_dir, cut, "train.optimizer=adamw_8bit", "train.max_steps=2")
    resumed = train(dit_dir, cut, "train.optimizer=adamw_8bit", "train.resume=latest")
    a, b = weights(final), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["full", "regional"])
def test_compiled_training_keeps_the_loss_and_the_stock_weights(dit_dir: Path, tmp_path: Path, mode: str):
    plain = tmp_path / "plain"
    plain_final = train(dit_dir, plain)
    compiled = tmp_path / mode
    final = train(dit_dir, compiled, f"train.compile={mode}")
    assert losses(compiled) == pytest.approx(losses(plain), rel=1e-3)
    a, b = weights(plain_final), weights(final)
    assert a.keys() == b.keys()  # no _orig_mod. prefix: the saved model is stock
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    DiTTransformer2DModel.from_pretrained(final / "transformer")


def test_regional_compile_finds_the_repeated_blocks(tmp_path: Path):
    dit = DiTTransformer2DModel(
        num_layers=3, num_attention_heads=2, attention_head_dim=8, in_channels=3, sample_size=8, patch_size=2
    )
    assert repeated_blocks(dit) == list(dit.transformer_blocks)
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )
    assert repeated_blocks(unet) == [*unet.down_blocks, *unet.up_blocks, unet.mid_block]


def test_compiled_unet_trains_as_eager_or_is_refused(unet_dir: Path, tmp_path: Path):
    """A UNet's blocks of one class run at several resolutions (compiled with dynamic shapes, inductor
    crashed). torch 2.13's inductor also zeroes the gradients through this UNet's lowest up block on a
    CPU: the first-batch check must refuse that run rather than let half the model not train."""
    eager = train(unet_dir, tmp_path / "eager")
    try:
        compiled = train(unet_dir, tmp_path / "regional", "train.compile=regional")
    except UserError as err:
        assert "differ from eager mode's" in str(err) and "\n" not in str(err)
        assert not (tmp_path / "regional" / "checkpoints").exists()
        return
    assert losses(tmp_path / "regional") == pytest.approx(losses(tmp_path / "eager"), rel=1e-3)
    start, a, b = weights(unet_dir, "unet"), weights(eager, "unet"), weights(compiled, "unet")
    moved = sum((a[k] - start[k]).pow(2).sum() for k in a).sqrt()
    assert sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt() < 0.05 * moved
    UNet2DModel.from_pretrained(compiled / "unet")


def test_compile_check_refuses_gradients_a_backend_loses(dit_dir: Path, tmp_path: Path, monkeypatch):
    def zero_gradients(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        def run(*args: object) -> object:
            out = gm(*args)
            return [o.detach() + 0 * o if torch.is_tensor(o) and o.requires_grad else o for o in out]

        return run

    def compile_with_faulty_backend(model: torch.nn.Module, mode: str) -> int:
        model.compile(backend=zero_gradients)
        return 1

    monkeypatch.setattr(speed, "compile_model", compile_with_faulty_backend)
    with pytest.raises(UserError, match="no gradient reaches") as err:
        train(dit_dir, tmp_path / "broken", "train.compile=full")
    assert "\n" not in str(err.value)


def test_gradient_comparison_tells_rounding_from_lost_gradients():
    names = ["a", "b", "c"]
    eager = [torch.ones(4), torch.full((2,), 0.5), torch.full((3,), 1e-9)]
    assert compare_gradients(names, eager, [g * (1 + 1e-6) for g in eager]).holds(1e-2)
    lost = compare_gradients(names, eager, [eager[0], torch.zeros(2), torch.zeros(3)])
    assert lost.vanished == ["b"] and not lost.holds(1.0)  # c's gradient is rounding noise: not counted
    off = compare_gradients(names, eager, [g * 1.1 for g in eager])
    assert off.relative_difference == pytest.approx(0.1, rel=1e-4) and not off.holds(1e-2)


def test_channels_last_unet_trains_to_the_same_weights(unet_dir: Path, tmp_path: Path):
    plain = train(unet_dir, tmp_path / "plain")
    last = train(unet_dir, tmp_path / "last", "train.channels_last=true")
    a, b = weights(plain, "unet"), weights(last, "unet")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    UNet2DModel.from_pretrained(last / "unet")


def test_math_attention_kernel_trains_as_auto(dit_dir: Path, tmp_path: Path):
    auto = train(dit_dir, tmp_path / "auto")
    math = train(dit_dir, tmp_path / "math", "train.sdpa_backend=math")
    a, b = weights(auto), weights(math)
    assert losses(tmp_path / "math") == pytest.approx(losses(tmp_path / "auto"), rel=1e-4)
    # PyTorch's CPU default is its flash kernel: the math one rounds differently (about 2e-5 here)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU")
def test_attention_kernel_the_device_lacks_is_refused():
    kernel = attention_kernel("cudnn", torch.device("cpu"))
    with pytest.raises(UserError, match="train.sdpa_backend=cudnn cannot run on cpu"), kernel:
        pass


def test_report_to_none_writes_no_tensorboard_and_keeps_metrics(dit_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    train(dit_dir, run, "train.report_to=none")
    assert not (run / "difftune").exists()
    assert len(losses(run)) == 4


def test_tracker_not_installed_is_refused_before_training(dit_dir: Path, tmp_path: Path, monkeypatch):
    from accelerate.utils import imports

    monkeypatch.setattr(imports, "is_wandb_available", lambda: False)
    with pytest.raises(UserError, match="pip install wandb"):
        train(dit_dir, tmp_path / "run", "train.report_to=wandb")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tf32_setting_is_applied_with_one_precision_api(dit_dir: Path, tmp_path: Path):
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")  # as the commands start (start_torch)
        train(dit_dir, tmp_path / "run", "train.allow_tf32=false", "train.max_steps=1")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        train(dit_dir, tmp_path / "run2", "train.max_steps=1")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        # the legacy and the new API were not mixed: reading the precision (torch.compile does) works
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
