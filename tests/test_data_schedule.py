"""Data-driven ψ and ξ (docs/method.md §10): the fit, the tabulated schedule and the training run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

import difftune.training.fitted_schedule
import test_training
from conftest import run_torchrun
from difftune.backbones import load_pretrained
from difftune.backbones.base import ClassConditionalBackbone
from difftune.backbones.conditioning import Conditioning
from difftune.cli import main
from difftune.config.checks import ConfigError
from difftune.errors import UserError
from difftune.objectives import build_objective
from difftune.process import build_process
from difftune.schedules.base import build_schedule, tabulated, timestep_bins
from difftune.schedules.data_driven import DataSchedule, fit_data_schedule, gap_densities
from difftune.training.loop import Trainer
from test_training import (
    _torchrun,
    assert_all_equal,
    assert_same_training,
    make_cfg,
    metrics,
    overrides,
    weights,
)

dit_bank = test_training.dit_bank  # the fixture: the tiny DiT's knowledge bank
T = 1000
DATA_DRIVEN = (
    "objective.target_schedule=data_driven",
    "objective.bank_schedule=data_driven",
    "objective.data_driven.bins=4",
    "objective.data_driven.draws=2",
)
TARGET_X0, BANK_X0 = 0.5, -0.5  # the fake model's clean samples: target rows, bank (null-label) rows


class Oracle(ClassConditionalBackbone):
    """A fake pre-trained model that knows the clean sample of each set, so it predicts exactly.

    It adds ``error`` to every prediction and ``extra`` more on target rows (labels < K) at t >= T/2:
    its loss on the target then exceeds its loss on its own samples at high noise only. It records
    every call's (x_t, t, labels).
    """

    def __init__(self, prediction_type: str = "epsilon", error: float = 0.0, extra: float = 0.0) -> None:
        super().__init__()
        self.num_classes, self.sample_shape, self.learns_variance = 5, (1, 4, 4), False
        self.inner = torch.nn.Identity()
        self.scheduler = DDPMScheduler(prediction_type=prediction_type)
        self.error, self.extra = error, extra
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def clean(self, labels: torch.Tensor) -> torch.Tensor:
        """The clean sample the oracle assumes for each row, (N, 1, 1, 1)."""
        return torch.where(labels < self.num_classes, TARGET_X0, BANK_X0).double().view(-1, 1, 1, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        labels = cond["labels"]
        self.calls.append((x_t.clone(), t.clone(), labels.clone()))
        abar = self.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        x0 = self.clean(labels).expand_as(x_t)
        eps = (x_t.double() - abar.sqrt() * x0) / (1 - abar).sqrt()
        exact = {
            "epsilon": eps,
            "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0,
            "sample": x0,
        }[self.scheduler.config.prediction_type]
        bad = (labels < self.num_classes) & (t >= T // 2)
        return (exact + self.error + self.extra * bad.double().view(-1, 1, 1, 1)).float()


def _fit(model: Oracle, n_target: int = 12, n_bank: int = 20, **kw) -> DataSchedule:
    target_cond = model.condition(torch.arange(n_target) % model.num_classes)
    settings = {"num_bins": 4, "draws_per_bin": 3, "batch_size": 8, **kw}
    return fit_data_schedule(
        model,
        model.scheduler.config,
        torch.full((n_target, *model.sample_shape), TARGET_X0),
        target_cond,
        torch.full((n_bank, *model.sample_shape), BANK_X0),
        model.unconditional(n_bank),
        **settings,
    )


def _mean_over_t(per_bin: list[float], num_bins: int) -> float:
    widths = timestep_bins(T, num_bins).diff().double()
    return float((torch.tensor(per_bin, dtype=torch.float64) * widths).sum() / T)


# ------------------------------------------------------------------------------------- densities


def test_densities_are_positive_with_mean_one_and_tabulate_exactly() -> None:
    gap = torch.tensor([0.0, 0.3, -0.2, 1.1, 0.7, 0.05, 0.0])
    widths = timestep_bins(T, 7).diff()
    psi, xi, uniform = gap_densities(gap, widths)
    assert not uniform
    for weights_ in (psi, xi):
        assert (weights_ > 0).all()
        assert float((weights_ * widths).sum() / T) == pytest.approx(1.0, abs=1e-12)
        # the schedule over t is the per-bin table: piecewise constant, mean 1, both realisations
        schedule = tabulated(weights_.tolist(), T)
        assert torch.allclose(schedule.weights(), weights_.repeat_interleave(widths), rtol=1e-12, atol=0)
        assert schedule.weights().mean().item() == pytest.approx(1.0, abs=1e-12)
    # ψ follows the positive gap, ξ its complement; the floor is 0.1 of the largest gap
    assert psi.argmax() == 3 and xi.argmin() == 3
    assert psi[0] == psi[2] == psi[6] and psi[3] / psi[0] == pytest.approx((1.1 + 0.11) / 0.11)
    assert xi[0] / xi[3] == pytest.approx((1.1 + 0.11) / 0.11)


def test_a_small_gap_shapes_the_schedules_only_in_proportion() -> None:
    # below a largest gap of 1 the floor stays 0.1: a 5% loss ratio moves weights by 1.5x, not 11x
    psi, xi, _ = gap_densities(torch.tensor([0.05, 0.0, 0.0, 0.0]), timestep_bins(T, 4).diff())
    assert psi[0] / psi[1] == pytest.approx(1.5) and xi[1] / xi[0] == pytest.approx(1.5)


@pytest.mark.parametrize("gap", [torch.zeros(5), torch.tensor([-0.1, -2.0, 0.0, -0.3, -0.01])])
def test_no_positive_gap_gives_uniform(gap: torch.Tensor) -> None:
    psi, xi, uniform = gap_densities(gap, timestep_bins(T, 5).diff())
    assert uniform and torch.equal(psi, torch.ones(5, dtype=torch.float64)) and torch.equal(xi, psi)


# ---------------------------------------------------------------------------------------- the fit


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_a_model_exact_on_both_sets_has_zero_loss_in_its_own_parameterisation(prediction_type: str) -> None:
    fit = _fit(Oracle(prediction_type))
    assert fit.prediction_type == prediction_type
    assert max(fit.loss_target + fit.loss_bank) < 1e-8


def test_target_and_bank_rows_share_t_and_noise() -> None:
    model = Oracle(error=0.1)
    fit = _fit(model, n_target=12, n_bank=20, batch_size=8)
    assert fit.rows_per_draw == 8 and fit.forward_passes == 2 * 4 * 3 == len(model.calls)
    scheduler = model.scheduler
    for (x_target, t_target, labels_target), (x_bank, t_bank, labels_bank) in zip(
        model.calls[::2], model.calls[1::2], strict=True
    ):
        assert (labels_target < 5).all() and (labels_bank == 5).all()  # target conditions, then the null one
        assert torch.equal(t_target, t_bank)
        abar = scheduler.alphas_cumprod[t_target].view(-1, 1, 1, 1)
        noise_target = (x_target - abar.sqrt() * TARGET_X0) / (1 - abar).sqrt()
        noise_bank = (x_bank - abar.sqrt() * BANK_X0) / (1 - abar).sqrt()
        torch.testing.assert_close(noise_target, noise_bank, rtol=0, atol=1e-3)
    # every bin drew its own t within its range
    edges = timestep_bins(T, 4)
    for b in range(4):
        for _, t, _ in model.calls[2 * 3 * b : 2 * 3 * (b + 1)]:
            assert ((t >= edges[b]) & (t < edges[b + 1])).all()
    assert fit.loss_target == pytest.approx([0.01] * 4, rel=1e-4)  # the constant error 0.1, squared


def test_a_gap_at_high_t_puts_psi_at_high_t_and_xi_at_low_t() -> None:
    fit = _fit(Oracle(error=0.1, extra=0.5))
    assert not fit.uniform
    assert fit.gap[2] == pytest.approx(fit.gap[3]) == pytest.approx(torch.tensor(36.0).log().item(), rel=1e-3)
    assert abs(fit.gap[0]) < 1e-3 and abs(fit.gap[1]) < 1e-3
    assert min(fit.psi[2:]) > 5 * max(fit.psi[:2])
    assert min(fit.xi[:2]) > 5 * max(fit.xi[2:])
    for weights_ in (fit.psi, fit.xi):
        assert min(weights_) > 0 and _mean_over_t(weights_, 4) == pytest.approx(1.0, abs=1e-12)


def test_a_zero_gap_gives_uniform_schedules_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    model = Oracle(error=0.1)
    x0 = torch.full((10, *model.sample_shape), BANK_X0)
    with caplog.at_level("WARNING"):
        fit = fit_data_schedule(
            model, model.scheduler, x0, model.unconditional(10), x0.clone(), model.unconditional(10), 5, 2
        )
    assert fit.gap == [0.0] * 5 and fit.uniform
    assert fit.psi == [1.0] * 5 and fit.xi == [1.0] * 5
    assert "no transfer gap" in caplog.text and "uniform" in caplog.text


def test_fit_on_a_tiny_dit_round_trips_through_json(dit_dir: Path, tmp_path: Path) -> None:
    loaded = load_pretrained(str(dit_dir))
    backbone = loaded.backbone.train()
    g = torch.Generator().manual_seed(0)
    target = torch.rand((12, 1, 8, 8), generator=g) * 2 - 1
    bank = torch.randn((16, 1, 8, 8), generator=g) * 0.5
    fit = fit_data_schedule(
        backbone,
        loaded.scheduler_config,
        target,
        backbone.condition(torch.arange(12) % 5),
        bank,
        backbone.unconditional(16),
        num_bins=6,
        draws_per_bin=2,
        batch_size=32,
    )
    assert backbone.training  # its mode is restored
    assert fit.forward_passes == 2 * 6 * 2 and fit.rows_per_draw == 12 and fit.seconds > 0
    assert fit.t_low == [0, 167, 333, 500, 667, 833] and fit.t_high[-1] == T - 1
    for weights_ in (fit.psi, fit.xi):
        assert min(weights_) > 0 and _mean_over_t(weights_, 6) == pytest.approx(1.0, abs=1e-12)
    fit.save(tmp_path / "fit.json")
    assert DataSchedule.load(tmp_path / "fit.json") == fit  # floats exactly

    raw = json.loads((tmp_path / "fit.json").read_text())
    raw["psi"] = raw["psi"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="damaged"):
        DataSchedule.load(tmp_path / "bad.json")


def test_a_gap_within_the_noise_is_flagged(dit_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Target and bank drawn from one distribution: whatever gap is measured is noise, and it says so."""
    loaded = load_pretrained(str(dit_dir))
    backbone = loaded.backbone
    x0 = torch.rand((24, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    null = backbone.unconditional(12)
    with caplog.at_level("WARNING"):
        fit = fit_data_schedule(backbone, loaded.scheduler_config, x0[:12], null, x0[12:], null, 6, 4)
    assert "within two standard errors" in caplog.text
    assert len(fit.gap_se) == 6 and min(fit.gap_se) > 0
    assert max(fit.psi) / min(fit.psi) < 1.2  # a gap of ~0.01 barely shapes ψ
    one_draw = fit_data_schedule(backbone, loaded.scheduler_config, x0[:12], null, x0[12:], null, 6, 1)
    assert one_draw.gap_se is None


def test_data_driven_needs_a_fit_and_a_bank() -> None:
    with pytest.raises(UserError, match="fitted from data before training"):
        build_schedule("data_driven", T)
    base = ["model.pretrained=x", "data.source=digits", "objective.bank_schedule=data_driven"]
    for extra in (["objective.retention_data=target"], ["bank.path=b", "objective.bank_share=0"]):
        with pytest.raises(ConfigError, match="needs a bank") as info:
            make_cfg(Path("x"), Path("out"), None, *base[1:], *extra)
        assert "\n" not in str(info.value)


def test_objective_uses_the_fit_for_both_streams() -> None:
    model = Oracle(error=0.1, extra=0.5)
    fit = _fit(model)
    cfg = make_cfg(Path("x"), Path("out"), Path("bank"), *DATA_DRIVEN).objective
    objective = build_objective(cfg, build_process(model.scheduler.config), model, fit)
    widths = timestep_bins(T, 4).diff()
    for schedule, per_bin in zip(objective.schedules, (fit.psi, fit.xi), strict=True):
        expected = torch.tensor(per_bin, dtype=torch.float64).repeat_interleave(widths)
        assert torch.allclose(schedule.weights(), expected, rtol=1e-12, atol=0)
    with pytest.raises(UserError, match="data_driven"):
        build_objective(cfg, build_process(model.scheduler.config), model)


# ------------------------------------------------------------------------------------- training


def test_training_fits_once_and_resumes_exactly_without_refitting(
    dit_dir: Path, dit_bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    steps = ("train.max_steps=6", "train.checkpoint_every=3")
    final_a = Trainer(make_cfg(dit_dir, run_a, dit_bank, *steps, *DATA_DRIVEN)).train()
    fit_a = DataSchedule.load(run_a / "data_schedule.json")
    assert fit_a.forward_passes == 2 * 4 * 2 and fit_a.rows_per_draw == 10 and not fit_a.uniform
    summary = json.loads((run_a / "run_summary.json").read_text())["data_schedule"]
    assert summary["refitted"] and summary["forward_passes"] == 16 and summary["seconds"] == fit_a.seconds

    first = Trainer(
        make_cfg(dit_dir, run_b, dit_bank, "train.max_steps=3", "train.checkpoint_every=3", *DATA_DRIVEN)
    )
    first.train()
    assert DataSchedule.load(
        run_b / "checkpoints" / "checkpoint-0000003" / "state" / "data_schedule.json"
    ) == (first.data_schedule)
    # the same data and seed give the same fit, but for the time it took
    assert {**first.data_schedule.to_dict(), "seconds": 0} == {**fit_a.to_dict(), "seconds": 0}

    fits: list[int] = []
    original = difftune.training.fitted_schedule.fit_data_schedule
    monkeypatch.setattr(
        difftune.training.fitted_schedule,
        "fit_data_schedule",
        lambda *a, **k: fits.append(1) or original(*a, **k),
    )
    (run_b / "data_schedule.json").unlink()  # the checkpoint's copy is enough
    resumed = Trainer(make_cfg(dit_dir, run_b, dit_bank, *steps, "train.resume=latest", *DATA_DRIVEN))
    final_b = resumed.train()
    assert fits == [] and resumed.data_schedule == first.data_schedule
    assert json.loads((run_b / "run_summary.json").read_text())["data_schedule"]["refitted"] is False
    assert (run_b / "data_schedule.json").is_file()

    assert_all_equal(weights(final_a), weights(final_b))
    assert_all_equal(weights(final_a, "ema/transformer"), weights(final_b, "ema/transformer"))
    assert metrics(run_a) == metrics(run_b)


def test_dry_run_describes_the_fit(dit_dir: Path, dit_bank: Path, tmp_path: Path, capsys) -> None:
    sets = [f"--set={item}" for item in overrides(dit_dir, tmp_path / "run", dit_bank, *DATA_DRIVEN)]
    assert main(["train", "--dry-run", *sets]) == 0
    out = capsys.readouterr().out
    assert "target_schedule and bank_schedule data_driven: fitted before training: 16 forward passes" in out
    assert "schedules  target data_driven, bank data_driven, realisation" in out  # no meaningless exponent
    assert not (tmp_path / "run").exists()


def test_ddp_ranks_train_with_the_main_process_fit(dit_dir: Path, tmp_path: Path) -> None:
    """Two gloo processes: the fit is made once and broadcast; it equals the one-process fit."""
    extra = ("train.checkpoint_every=0", "objective.bank_share=0.3", *DATA_DRIVEN)
    ddp_args = overrides(dit_dir, tmp_path / "ddp_run", tmp_path / "bank", *extra)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    run_torchrun(_torchrun(tmp_path / "ranks", ddp_args), env, cwd=Path(__file__).resolve().parent.parent)
    ranks = [json.loads((tmp_path / "ranks" / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["num_processes"] == 2 and ranks[0]["data_schedule"] == ranks[1]["data_schedule"]

    single = Trainer(make_cfg(dit_dir, tmp_path / "single_run", tmp_path / "bank", *extra)).train()
    fit = json.loads((tmp_path / "single_run" / "data_schedule.json").read_text())
    assert {**fit, "seconds": 0} == {**ranks[0]["data_schedule"], "seconds": 0}
    assert_same_training(weights(single), weights(tmp_path / "ddp_run" / "final"), atol=1e-5, steps=4)
