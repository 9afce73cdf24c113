"""The binned loss, the data-driven fit, the transfer gap and the swap probe on DDPM, rectified flow and EDM
models: each reads the noise through the model's own process (docs/method.md §1, §10, §12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from difftune.analysis.forgetting import swap_probe, transfer_gap
from difftune.backbones import load_pretrained
from difftune.backbones.base import ClassConditionalBackbone
from difftune.backbones.conditioning import Conditioning
from difftune.bank import generate_bank
from difftune.process import DEFAULT_SAMPLERS, build_process
from difftune.sampling.generate import build_scheduler, generate
from difftune.schedules.data_driven import fit_data_schedule
from difftune.testing.models import tiny_dit, tiny_unet
from difftune.training.loop import Trainer
from test_training import make_cfg

SCHEDULERS = {
    "ddpm": DDPMScheduler(),
    "flow": FlowMatchEulerDiscreteScheduler(shift=3.0),
    "edm": EDMEulerScheduler(),
}
PREDICTS = {"ddpm": "epsilon", "flow": "velocity", "edm": "epsilon"}
TARGET_X0, BANK_X0 = 0.5, -0.5


def _config(name: str) -> dict:
    scheduler = SCHEDULERS[name]
    return {"_class_name": type(scheduler).__name__, **scheduler.config}


class Oracle(ClassConditionalBackbone):
    """A model that knows each row's clean sample (target rows ``TARGET_X0``, null-label rows ``BANK_X0``) and
    answers with the exact regression target of any process, recovered from what the process feeds it
    (its input sample and time) through the process's own maps; plus ``error`` on every output and ``extra``
    on rows whose clean sample is ``TARGET_X0`` in the noisier half of the indices. ``null_x0``: the clean
    sample it takes a null-label row to have."""

    def __init__(self, name: str, error: float = 0.0, extra: float = 0.0, null_x0: float = BANK_X0) -> None:
        super().__init__()
        self.num_classes, self.sample_shape, self.learns_variance = 5, (1, 4, 4), False
        self.inner = torch.nn.Identity()
        self.process = build_process(_config(name))
        T = self.process.num_timesteps
        zeros, ones = (
            torch.zeros(T, 1, 1, 1, dtype=torch.float64),
            torch.ones(T, 1, 1, 1, dtype=torch.float64),
        )
        index = torch.arange(T)
        scale, self.times = self.process.model_input(ones, index)  # the input is scale(t)·x_t
        self.scale = scale.flatten()
        self.x0_of_xt = self.process.x0(zeros, ones, index).flatten()  # x̂0 = a(t)·x_t + b(t)·prediction
        self.x0_of_pred = self.process.x0(ones, zeros, index).flatten()
        self.error, self.extra, self.null_x0 = error, extra, null_x0

    def forward(self, x_in: torch.Tensor, time: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        t = (time.double().view(-1, 1) - self.times.double().view(1, -1)).abs().argmin(1)
        x_t = x_in.double() / self.scale[t].view(-1, 1, 1, 1)
        labels = cond["labels"]
        x0 = torch.where(labels < self.num_classes, TARGET_X0, self.null_x0).double().view(-1, 1, 1, 1)
        exact = (x0 - self.x0_of_xt[t].view(-1, 1, 1, 1) * x_t) / self.x0_of_pred[t].view(-1, 1, 1, 1)
        noisy = (x0.flatten() == TARGET_X0) & (t >= self.process.num_timesteps // 2)
        return (exact + self.error + self.extra * noisy.double().view(-1, 1, 1, 1)).float()


def _sets(model: Oracle, n: int = 12) -> tuple[torch.Tensor, Conditioning, torch.Tensor, Conditioning]:
    return (
        torch.full((n, *model.sample_shape), TARGET_X0),
        model.condition(torch.arange(n) % model.num_classes),
        torch.full((n, *model.sample_shape), BANK_X0),
        model.unconditional(n),
    )


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_an_exact_model_has_zero_loss_and_the_fit_follows_the_gap_on_every_process(name: str) -> None:
    exact = fit_data_schedule(Oracle(name), _config(name), *_sets(Oracle(name)), num_bins=4, draws_per_bin=2)
    assert max(exact.loss_target + exact.loss_bank) < 1e-8  # the process's own target and model input
    assert exact.prediction_type == PREDICTS[name] and exact.num_timesteps == 1000
    model = Oracle(name, error=0.1, extra=0.5)
    fit = fit_data_schedule(
        model, SCHEDULERS[name], *_sets(model), num_bins=4, draws_per_bin=2
    )  # a scheduler
    assert fit.prediction_type == PREDICTS[name]
    assert fit.gap[2] == pytest.approx(fit.gap[3]) == pytest.approx(float(torch.tensor(36.0).log()), rel=1e-3)
    assert abs(fit.gap[0]) < 1e-3 and abs(fit.gap[1]) < 1e-3
    assert min(fit.psi[2:]) > 5 * max(fit.psi[:2]) and min(fit.xi[:2]) > 5 * max(fit.xi[2:])


@pytest.mark.parametrize("name", ["flow", "edm"])
def test_the_transfer_gap_compares_two_models_through_the_process(name: str) -> None:
    finetuned = Oracle(name)
    pretrained = Oracle(
        name, extra=0.3, null_x0=TARGET_X0
    )  # unconditional, it knows the target only at low noise
    x0, cond, _, _ = _sets(finetuned)
    rows = transfer_gap(finetuned, pretrained, _config(name), x0, cond, num_bins=4, draws_per_bin=2)
    assert [(r["t_low"], r["t_high"]) for r in rows] == [(0, 249), (250, 499), (500, 749), (750, 999)]
    assert [r["finetuned"] for r in rows] == pytest.approx([0.0] * 4, abs=1e-8)
    assert [r["gap"] for r in rows] == pytest.approx([0.0, 0.0, 0.09, 0.09], abs=1e-6)


def _tiny(name: str, root: Path, seed: int) -> Path:
    model = tiny_unet(seed=seed) if name == "edm" else tiny_dit(learn_sigma=False, seed=seed)
    model.save_pretrained(root / ("unet" if name == "edm" else "transformer"))
    SCHEDULERS[name].save_pretrained(root / "scheduler")
    return root


class _Recording:
    """A backbone that records the times it is called at."""

    def __init__(self, backbone) -> None:
        self.backbone, self.times = backbone, []

    def __call__(self, x_in, time, cond):
        self.times.append(float(time[0]))
        return self.backbone(x_in, time, cond)

    def __getattr__(self, name: str):
        return getattr(self.backbone, name)


@pytest.mark.parametrize("name", ["flow", "edm"])
def test_the_swap_probe_hands_the_low_noise_end_to_the_pretrained_model(name: str, tmp_path: Path) -> None:
    fine = load_pretrained(str(_tiny(name, tmp_path / "fine", seed=0)))
    pre = load_pretrained(str(_tiny(name, tmp_path / "pre", seed=1)))
    scheduler = build_scheduler(DEFAULT_SAMPLERS[name], fine.scheduler_config)
    cond, seeds = fine.backbone.condition(torch.tensor([0, 3])), [4, 5]
    samples: list[torch.Tensor] = []

    def score(x: torch.Tensor) -> float:
        samples.append(x)
        return float(x.double().pow(2).mean())

    fine_rec, pre_rec = _Recording(fine.backbone), _Recording(pre.backbone)
    rows = swap_probe(
        fine_rec, pre_rec, scheduler, cond, seeds, score, (0.0, 0.5, 1.0), num_inference_steps=4
    )
    assert [r["fraction"] for r in rows] == [0.0, 0.5, 1.0]
    only_fine = generate(fine.backbone, scheduler, cond, seeds, 1.0, 4)
    only_pre = generate(pre.backbone, scheduler, pre.backbone.unconditional(2), seeds, 1.0, 4)
    assert torch.equal(samples[0], only_fine) and torch.equal(samples[2], only_pre)
    assert not torch.equal(samples[1], only_fine) and not torch.equal(samples[1], only_pre)
    assert torch.isfinite(torch.stack(samples)).all()
    # f = 0.5: the fine-tuned model the first two (noisiest) steps, the pre-trained one the last two
    fine_times, pre_times = fine_rec.times[4:6], pre_rec.times[:2]
    assert min(fine_times) > max(pre_times)  # time grows with the noise on every process
    assert len(fine_rec.times) == 4 + 2 and len(pre_rec.times) == 2 + 4


@pytest.mark.parametrize("name", ["flow", "edm"])
def test_a_data_driven_run_fits_through_the_models_process(name: str, tmp_path: Path) -> None:
    base = _tiny(name, tmp_path / "base", seed=0)
    bank, run = tmp_path / "bank", tmp_path / "run"
    settings = (
        "objective.target_schedule=data_driven",
        "objective.bank_schedule=data_driven",
        "objective.data_driven.bins=4",
        "objective.data_driven.draws=2",
        "train.max_steps=2",
    )
    cfg = make_cfg(base, run, bank, *settings)
    generate_bank(load_pretrained(str(base)), cfg.bank, progress=False)
    Trainer(cfg).train()
    fit = json.loads((run / "data_schedule.json").read_text())
    assert fit["prediction_type"] == PREDICTS[name] and fit["num_timesteps"] == 1000
    assert all(loss > 0 for loss in fit["loss_target"] + fit["loss_bank"])
