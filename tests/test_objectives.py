"""Tests for difftune.objectives (Diff-Tuning loss, prediction targets, variational bound, term log) on fixed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from difftune.backbones.conditioning import Conditioning
from difftune.objectives import DiffTuningLoss, Draw, LossTerms
from difftune.objectives.variational_bound import VariationalBound
from difftune.process import build_process
from difftune.schedules.base import power_down, power_up

T = 1000
NUM_CLASSES = 5
NULL = NUM_CLASSES
C, H, W = 2, 4, 4


class FakeModel(nn.Module):
    """Output = scale * x_t + offset[label] + t / T (mean), optionally followed by tanh(x_t) (variance)."""

    def __init__(self, learn_sigma: bool = False, scale: float = 0.5) -> None:
        super().__init__()
        self.learn_sigma = learn_sigma
        self.scale = scale
        self.offsets = torch.linspace(-1.0, 1.0, NUM_CLASSES + 1)
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        labels = cond["labels"]
        self.seen.append(labels.clone())
        mean = self.scale * x_t + self.offsets[labels].view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1).float() / T
        if self.learn_sigma:
            return torch.cat([mean, torch.tanh(x_t)], dim=1)
        return mean


class LeafModel(nn.Module):
    """Returns a fixed leaf tensor (whatever the input), so that gradients w.r.t. the output can be read."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = nn.Parameter(out.clone())

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.out


def _loss(prediction_type: str = "epsilon", **kwargs) -> DiffTuningLoss:
    kwargs.setdefault("bank_weight", 0.1)
    kwargs.setdefault("cfg_dropout", 0.1)
    process = build_process(DDPMScheduler(prediction_type=prediction_type).config)
    return DiffTuningLoss(process, power_up(T, 1.0), power_down(T, 1.0), **kwargs)


def _abar64() -> torch.Tensor:
    return DDPMScheduler().alphas_cumprod.to(torch.float64)


@pytest.fixture
def batch():
    """Fixed inputs: 4 target rows (row 1 dropped to the null label) then 2 bank rows (null label).

    The conditions are given as the trainer hands them over: guidance drop and bank routing applied.
    """
    g = torch.Generator().manual_seed(0)
    n = 6
    x0 = torch.rand((n, C, H, W), generator=g) * 2 - 1
    labels = Conditioning({"labels": torch.tensor([0, NULL, 2, 3, NULL, NULL])})
    is_bank = torch.tensor([False, False, False, False, True, True])
    t = torch.tensor([0, 17, 500, 999, 3, 250])
    noise = torch.randn((n, C, H, W), generator=g)
    drop = torch.tensor([False, True, False, False, False, False])
    return x0, labels, is_bank, Draw(t, noise, drop, is_bank)


def _hand_xt(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ab = _abar64()[t].view(-1, 1, 1, 1)
    return ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()


def _hand_mean(x_t: torch.Tensor, t: torch.Tensor, routed: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    offsets = torch.linspace(-1.0, 1.0, NUM_CLASSES + 1).double()
    return scale * x_t + offsets[routed].view(-1, 1, 1, 1) + t.double().view(-1, 1, 1, 1) / T


# -------------------------------------------------------------------------------- per-sample loss


def test_epsilon_loss_equals_hand_computation(batch) -> None:
    x0, labels, is_bank, draw = batch
    loss_fn = _loss()
    terms = loss_fn(FakeModel(), x0, labels, is_bank, draw)
    routed = torch.tensor([0, NULL, 2, 3, NULL, NULL])
    pred = _hand_mean(_hand_xt(x0, draw.noise, draw.t), draw.t, routed)
    expected = ((pred - draw.noise.double()) ** 2).flatten(1).mean(1)
    assert isinstance(terms, LossTerms)
    assert terms.loss.shape == (6,)
    assert torch.allclose(terms.loss.double(), expected, rtol=1e-5, atol=0)
    assert torch.equal(terms.raw, terms.loss.detach())  # "sample" realisation: unit weight
    assert torch.equal(terms.t, draw.t) and torch.equal(terms.is_bank, is_bank)


def test_conditions_pass_through_in_one_forward_pass(batch) -> None:
    x0, labels, is_bank, draw = batch
    model = FakeModel()
    terms = _loss()(model, x0, labels, is_bank, draw)
    assert len(model.seen) == 1  # one forward pass for target and bank together
    assert model.seen[0].tolist() == [0, NULL, 2, 3, NULL, NULL]  # untouched: routing is the backbone's
    assert set(terms.terms) == {"mse"}
    assert torch.equal(terms.terms["mse"], terms.raw)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_sample_prediction_targets(batch, prediction_type: str) -> None:
    x0, labels, is_bank, draw = batch
    terms = _loss(prediction_type)(FakeModel(), x0, labels, is_bank, draw)
    ab = _abar64()[draw.t].view(-1, 1, 1, 1)
    if prediction_type == "v_prediction":
        target = ab.sqrt() * draw.noise.double() - (1 - ab).sqrt() * x0.double()
    else:
        target = x0.double()
    routed = torch.tensor([0, NULL, 2, 3, NULL, NULL])
    pred = _hand_mean(_hand_xt(x0, draw.noise, draw.t), draw.t, routed)
    expected = ((pred - target) ** 2).flatten(1).mean(1)
    assert torch.allclose(terms.loss.double(), expected, rtol=1e-5, atol=0)


def test_perfect_prediction_gives_zero_loss_for_every_parameterisation(batch) -> None:
    x0, labels, is_bank, draw = batch
    ab = _abar64()[draw.t].view(-1, 1, 1, 1)
    targets = {
        "epsilon": draw.noise.double(),
        "v_prediction": ab.sqrt() * draw.noise.double() - (1 - ab).sqrt() * x0.double(),
        "sample": x0.double(),
    }
    for prediction_type, target in targets.items():
        terms = _loss(prediction_type)(LeafModel(target.float()), x0, labels, is_bank, draw)
        assert torch.allclose(terms.loss, torch.zeros(6), atol=1e-10), prediction_type


# ------------------------------------------------------------------------------------- reduction


def test_reduce_equals_target_mean_plus_lambda_bank_mean() -> None:
    loss_fn = _loss(bank_weight=0.3)
    loss = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0], dtype=torch.float64)
    is_bank = torch.tensor([False, True, False, False, True, False, True])
    terms = LossTerms(loss=loss, t=torch.zeros(7, dtype=torch.long), is_bank=is_bank, terms={"mse": loss})
    expected = (1 + 4 + 8 + 32) / 4 + 0.3 * (2 + 16 + 64) / 3
    assert math.isclose(float(loss_fn.reduce(terms, 4, 3)), expected, rel_tol=1e-12)
    # no bank: the bank rows are not counted
    only_target = LossTerms(loss=loss[~is_bank], t=terms.t[:4], is_bank=is_bank[~is_bank])
    assert math.isclose(float(loss_fn.reduce(only_target, 4, 0)), 45 / 4, rel_tol=1e-12)


def test_reduce_of_split_batch_sums_to_whole(batch) -> None:
    x0, labels, is_bank, draw = batch
    loss_fn = _loss(bank_weight=0.25)
    model = FakeModel()
    n_target, n_bank = int((~is_bank).sum()), int(is_bank.sum())
    whole = loss_fn.reduce(loss_fn(model, x0, labels, is_bank, draw), n_target, n_bank)
    terms = loss_fn(model, x0, labels, is_bank, draw)
    by_hand = terms.loss[~is_bank].mean() + 0.25 * terms.loss[is_bank].mean()
    assert torch.allclose(whole, by_hand, rtol=1e-6)
    # uneven halves, as two processes (or two accumulation micro-steps) would see them
    total = torch.zeros(())
    for part in (slice(0, 2), slice(2, 6)):
        part_terms = loss_fn(model, x0[part], labels.select(part), is_bank[part], draw[part])
        total = total + loss_fn.reduce(part_terms, n_target, n_bank)
    assert torch.allclose(total, whole, rtol=1e-6)


def test_draw_slicing() -> None:
    bank = torch.tensor([False, False, False, True, True])
    draw = Draw(
        torch.arange(5), torch.randn(5, 1, 2, 2), torch.tensor([True, False, True, False, False]), bank
    )
    part = draw[1:4]
    assert part.t.tolist() == [1, 2, 3]
    assert torch.equal(part.noise, draw.noise[1:4])
    assert part.drop.tolist() == [False, True, False]
    assert part.bank.tolist() == [False, False, True]


# ---------------------------------------------------------------------------------- realisation


def test_weight_realisation_multiplies_by_stream_weight(batch) -> None:
    x0, labels, is_bank, draw = batch
    sampled = _loss("epsilon", realisation="sample")(FakeModel(), x0, labels, is_bank, draw)
    weighted = _loss("epsilon", realisation="weight")(FakeModel(), x0, labels, is_bank, draw)
    t = draw.t.double()
    psi = 2 * (t + 1) / (T + 1)  # power_up, s = 1
    xi = 2 * (T - t) / (T + 1)  # power_down, s = 1
    w = torch.where(is_bank, xi, psi)
    assert torch.allclose(weighted.raw, sampled.raw, rtol=1e-6)
    assert torch.allclose(weighted.loss.double(), sampled.raw.double() * w, rtol=1e-5, atol=0)
    # t = 999 on a target row weighs ~2, t = 3 on a bank row weighs ~2 as well, t = 0 on a target ~0
    assert not torch.allclose(weighted.loss, weighted.raw)


def test_invalid_realisation_and_mismatched_T_raise() -> None:
    with pytest.raises(ValueError, match="realisation"):
        _loss(realisation="both")
    with pytest.raises(ValueError, match="T=1000"):
        DiffTuningLoss(build_process(DDPMScheduler().config), power_up(500), power_down(T))


# ------------------------------------------------------------------------------------------- draw


def test_draw_reproduces_schedule_samples_in_order() -> None:
    loss_fn = _loss(cfg_dropout=0.3)
    n_t, n_b, shape = 13, 5, (C, H, W)
    d = loss_fn.draw(n_t, n_b, shape, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    t_target = power_up(T, 1.0).sample(n_t, g)
    t_bank = power_down(T, 1.0).sample(n_b, g)
    noise = torch.randn((n_t + n_b, *shape), generator=g)
    drop = torch.rand(n_t + n_b, generator=g) < 0.3
    drop[n_t:] = False
    assert torch.equal(d.t, torch.cat([t_target, t_bank]))
    assert torch.equal(d.noise, noise)
    assert torch.equal(d.drop, drop)
    assert d.t.dtype == torch.long and d.noise.shape == (n_t + n_b, *shape) and d.drop.dtype == torch.bool


def test_draw_streams_follow_their_schedules() -> None:
    loss_fn = _loss(cfg_dropout=0.25)
    n_t, n_b = 20_000, 20_000
    d = loss_fn.draw(n_t, n_b, (1, 1, 1), torch.Generator().manual_seed(5))
    t_target, t_bank = d.t[:n_t].double(), d.t[n_t:].double()
    # s = 1: E[t] = sum t (t+1) / sum (t+1) = (2T - 1) / 3 for psi, (T - 1) / 3 for xi
    se = math.sqrt(T**2 / 18 / n_t)
    assert abs(float(t_target.mean()) - (2 * T - 1) / 3) < 4 * se
    assert abs(float(t_bank.mean()) - (T - 1) / 3) < 4 * se
    assert float(t_target.mean()) > float(t_bank.mean()) + 200
    # dropout: only target rows, at rate cfg_dropout
    assert not d.drop[n_t:].any()
    rate = float(d.drop[:n_t].double().mean())
    assert abs(rate - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n_t)
    # noise is standard normal
    assert abs(float(d.noise.mean())) < 4 / math.sqrt(n_t + n_b)
    assert abs(float(d.noise.std()) - 1) < 0.02


def test_draw_under_weight_realisation_is_uniform() -> None:
    loss_fn = _loss(realisation="weight", cfg_dropout=0.0)
    n = 20_000
    d = loss_fn.draw(n, n, (1,), torch.Generator().manual_seed(6))
    se = math.sqrt((T**2 - 1) / 12 / n)
    for stream in (d.t[:n], d.t[n:]):
        assert abs(float(stream.double().mean()) - (T - 1) / 2) < 4 * se
    assert not d.drop.any()  # cfg_dropout = 0


def test_draw_with_empty_bank() -> None:
    d = _loss().draw(4, 0, (C, H, W), torch.Generator().manual_seed(0))
    assert d.t.shape == (4,) and d.noise.shape == (4, C, H, W) and d.drop.shape == (4,)


# ------------------------------------------------------------------------------ variational bound


def _np_reference_vb(betas, x0, x_t, t, pred_x0, v) -> np.ndarray:
    """Improved-DDPM / DiT L_vb in float64 numpy, bits per dimension, one value per sample."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    post_logvar_clipped = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)

    def cdf(x):
        return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))

    out = []
    for i, ti in enumerate(t):
        true_mean = coef1[ti] * x0[i] + coef2[ti] * x_t[i]
        true_logvar = post_logvar_clipped[ti]
        model_mean = coef1[ti] * pred_x0[i] + coef2[ti] * x_t[i]
        frac = (v[i] + 1.0) / 2.0
        model_logvar = frac * np.log(betas[ti]) + (1.0 - frac) * post_logvar_clipped[ti]
        if ti > 0:
            kl = 0.5 * (
                -1.0
                + model_logvar
                - true_logvar
                + np.exp(true_logvar - model_logvar)
                + (true_mean - model_mean) ** 2 * np.exp(-model_logvar)
            )
            out.append(kl.mean() / np.log(2.0))
        else:
            centered = x0[i] - model_mean
            inv_std = np.exp(-0.5 * model_logvar)
            cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
            cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
            log_probs = np.where(
                x0[i] < -0.999,
                np.log(np.maximum(cdf_plus, 1e-12)),
                np.where(
                    x0[i] > 0.999,
                    np.log(np.maximum(1.0 - cdf_min, 1e-12)),
                    np.log(np.maximum(cdf_plus - cdf_min, 1e-12)),
                ),
            )
            out.append(-log_probs.mean() / np.log(2.0))
    return np.array(out)


# Absolute floor: for large t the KL is ~1e-7 bits, the difference of O(1) float32 terms
# (-1 + dlogvar + exp(-dlogvar)), so float32 cannot give it to rtol 1e-5; the reference
# implementations (DiT) compute it in float32 the same way.
VB_ATOL = 2e-7


def _vb_inputs(t_values, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = len(t_values)
    t = torch.tensor(t_values)
    # data quantised to 256 levels in [-1, 1], including both edges
    x0 = torch.randint(0, 256, (n, C, H, W), generator=g).float() / 127.5 - 1.0
    x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0
    noise = torch.randn(x0.shape, generator=g)
    x_t = DDPMScheduler().add_noise(x0, noise, t)
    pred_x0 = x0 + 0.3 * torch.randn(x0.shape, generator=g)
    pred_x0[t == 0] = x0[t == 0] + 0.005 * torch.randn(x0[t == 0].shape, generator=g)
    v = torch.rand(x0.shape, generator=g) * 2 - 1
    return x0, x_t, t, pred_x0, v


def test_variational_bound_matches_reference() -> None:
    t_values = [0, 0, 1, 2, 10, 100, 300, 500, 998, 999]
    x0, x_t, t, pred_x0, v = _vb_inputs(t_values)
    betas = DDPMScheduler().betas
    got = VariationalBound(betas)(x0, x_t, t, pred_x0, v)
    ref = _np_reference_vb(
        betas.double().numpy(),
        *(a.double().numpy() for a in (x0, x_t)),
        t.numpy(),
        pred_x0.double().numpy(),
        v.double().numpy(),
    )
    assert got.shape == (len(t_values),)
    assert np.all(ref >= 0)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-5, atol=VB_ATOL)
    # the comparison is not vacuous where it matters: early steps are far above the floor
    assert np.all(ref[:6] > 1e3 * VB_ATOL)


def test_variational_bound_edge_bins_at_t0() -> None:
    # at t = 0 the model mean is pred_x0; x0 = -1 uses the CDF up to -1 + 1/255, x0 = 1 the tail above 1 - 1/255
    x0 = torch.tensor([-1.0, 1.0, 0.0, 1.0]).view(1, 4, 1, 1)
    pred = torch.tensor([-1.0, 1.0, 0.0, -1.0]).view(1, 4, 1, 1)
    v = torch.zeros_like(x0)
    t = torch.zeros(1, dtype=torch.long)
    betas = DDPMScheduler().betas
    got = VariationalBound(betas)(x0, x0, t, pred, v)
    ref = _np_reference_vb(
        betas.double().numpy(),
        x0.double().numpy(),
        x0.double().numpy(),
        [0],
        pred.double().numpy(),
        v.double().numpy(),
    )
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-5)
    # last element: x0 = 1 predicted at -1 is impossible -> clamped at log(1e-12)
    assert float(got) > -math.log(1e-12) / 4 / math.log(2) - 1e-3


def test_vb_term_added_for_2C_output_with_detached_mean(batch) -> None:
    x0, labels, is_bank, draw = batch
    g = torch.Generator().manual_seed(3)
    out = torch.cat(
        [torch.randn((6, C, H, W), generator=g), torch.rand((6, C, H, W), generator=g) * 2 - 1], 1
    )

    def run(learn_variance: bool):
        model = LeafModel(out)
        terms = _loss(learn_variance=learn_variance)(model, x0, labels, is_bank, draw)
        terms.loss.sum().backward()
        return terms, model.out.grad

    with_vb, grad_with = run(True)
    without_vb, grad_without = run(False)
    mse = ((out[:, :C].double() - draw.noise.double()) ** 2).flatten(1).mean(1)
    assert torch.allclose(without_vb.loss.double(), mse, rtol=1e-5, atol=0)

    # the added term is L_vb with pred_x0 from the epsilon prediction
    ab = _abar64()[draw.t].view(-1, 1, 1, 1)
    x_t = _hand_xt(x0, draw.noise, draw.t)
    pred_x0 = (x_t - (1 - ab).sqrt() * out[:, :C].double()) / ab.sqrt()
    vb_ref = _np_reference_vb(
        DDPMScheduler().betas.double().numpy(),
        x0.double().numpy(),
        x_t.numpy(),
        draw.t.numpy(),
        pred_x0.numpy(),
        out[:, C:].double().numpy(),
    )
    added = (with_vb.raw - without_vb.raw).double().numpy()
    np.testing.assert_allclose(added, vb_ref, rtol=1e-5, atol=VB_ATOL)
    assert set(with_vb.terms) == {"mse", "vb"} and set(without_vb.terms) == {"mse"}
    assert torch.equal(with_vb.raw, with_vb.terms["mse"] + with_vb.terms["vb"])
    assert np.all(added[draw.t.numpy() < 900] > 1e-3)

    # gradient: the VB part does not reach the mean channels, it does reach the variance channels
    assert torch.allclose(grad_with[:, :C], grad_without[:, :C], rtol=1e-6, atol=0)
    assert torch.count_nonzero(grad_without[:, C:]) == 0
    assert torch.count_nonzero(grad_with[:, C:][draw.t < 900]) == grad_with[:, C:][draw.t < 900].numel()


def test_variance_term_refuses_an_output_without_variance_channels(batch) -> None:
    x0, labels, is_bank, draw = batch
    assert _loss().learn_variance is False  # off unless the model declares it
    with pytest.raises(ValueError, match="returns 2 channels for 2-channel samples"):
        _loss(learn_variance=True)(FakeModel(learn_sigma=False), x0, labels, is_bank, draw)


def test_learn_variance_off_has_no_vb(batch) -> None:
    x0, labels, is_bank, draw = batch
    plain = _loss()(FakeModel(learn_sigma=False), x0, labels, is_bank, draw)
    no_vb = _loss(learn_variance=False)(FakeModel(learn_sigma=True), x0, labels, is_bank, draw)
    with_vb = _loss(learn_variance=True)(FakeModel(learn_sigma=True), x0, labels, is_bank, draw)
    assert torch.allclose(no_vb.loss, plain.loss, rtol=1e-6, atol=0)
    assert (with_vb.loss > plain.loss).all()


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("wanted", [True, False])
def test_variance_term_follows_the_backbone_declaration(learn_sigma: bool, wanted: bool) -> None:
    from conftest import tiny_dit
    from difftune.backbones import DiTBackbone
    from difftune.config.experiment import ObjectiveConfig
    from difftune.objectives import build_objective

    backbone = DiTBackbone(tiny_dit(learn_sigma=learn_sigma))
    assert backbone.learns_variance is learn_sigma
    objective = build_objective(
        ObjectiveConfig(learn_variance=wanted), build_process(DDPMScheduler().config), backbone
    )
    assert objective.learn_variance is (wanted and learn_sigma)
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    draw = objective.draw(2, 1, (1, 8, 8), torch.Generator().manual_seed(0))
    cond = backbone.drop(backbone.condition([0, 1, 0]), torch.tensor([False, False, True]))
    terms = objective(backbone, x0, cond, torch.tensor([False, False, True]), draw)
    assert set(terms.terms) == ({"mse", "vb"} if wanted and learn_sigma else {"mse"})


def test_unknown_objective_kind_lists_the_valid_ones() -> None:
    from difftune.config.experiment import ConfigError, ObjectiveConfig

    with pytest.raises(
        ConfigError, match=r"objective.kind='distil': use one of \['diff_tuning', 'distillation'\]"
    ):
        ObjectiveConfig(kind="distil")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vb_with_perfect_mean_equals_variance_only_bound(batch, prediction_type: str) -> None:
    # a perfect mean prediction makes pred_x0 = x0 in every parameterisation; only the variance term remains
    x0, labels, is_bank, draw = batch
    ab = _abar64()[draw.t].view(-1, 1, 1, 1)
    mean_target = {
        "epsilon": draw.noise.double(),
        "v_prediction": ab.sqrt() * draw.noise.double() - (1 - ab).sqrt() * x0.double(),
        "sample": x0.double(),
    }[prediction_type]
    v = torch.rand((6, C, H, W), generator=torch.Generator().manual_seed(4)) * 2 - 1
    out = torch.cat([mean_target.float(), v], 1)
    terms = _loss(prediction_type, learn_variance=True)(LeafModel(out), x0, labels, is_bank, draw)
    x_t = _hand_xt(x0, draw.noise, draw.t)
    ref = _np_reference_vb(
        DDPMScheduler().betas.double().numpy(),
        x0.double().numpy(),
        x_t.numpy(),
        draw.t.numpy(),
        x0.double().numpy(),
        v.double().numpy(),
    )
    np.testing.assert_allclose(terms.loss.detach().double().numpy(), ref, rtol=1e-5, atol=VB_ATOL)


# ------------------------------------------------------------------------------------------ logging


class _OneProcess:
    num_processes = 1


def test_term_log_logs_whatever_terms_appear_per_stream_and_quarter() -> None:
    from difftune.objectives.term_log import TermLog

    log = TermLog(T)
    t = torch.tensor([10, 260, 990, 5, 600])
    is_bank = torch.tensor([False, False, False, True, True])
    mse = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    extra = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5])
    for _ in range(2):  # two micro-steps of the same terms
        log.add(LossTerms(loss=mse * 2, t=t, is_bank=is_bank, terms={"mse": mse, "distill": extra}))
    out = log.flush(_OneProcess(), n_bank=2, bank_weight=0.1)
    assert out["loss/target"] == pytest.approx((2 + 4 + 6) / 3)  # the mean weighted loss per sample
    assert out["loss/bank"] == pytest.approx((8 + 10) / 2)
    assert out["loss/total"] == pytest.approx(out["loss/target"] + 0.1 * out["loss/bank"])
    assert out["mse_by_t/target_q1"] == 1.0 and out["mse_by_t/target_q2"] == 2.0
    assert (
        out["mse_by_t/target_q4"] == 3.0 and out["mse_by_t/bank_q1"] == 4.0 and out["mse_by_t/bank_q3"] == 5.0
    )
    assert out["distill_by_t/bank_q3"] == 0.5
    assert out["loss_by_t/target_q4"] == 3.5  # the sum of the terms
    assert "mse_by_t/target_q3" not in out  # no sample there
    assert "non_finite_samples" not in out
    assert math.isnan(log.flush(_OneProcess(), 2, 0.1)["loss/total"])  # reset: no sample since


def test_term_log_counts_non_finite_samples_instead_of_averaging_them() -> None:
    from difftune.objectives.term_log import TermLog

    log = TermLog(T)
    t, is_bank = torch.tensor([10, 600, 20]), torch.tensor([False, False, True])
    mse = torch.tensor([1.0, float("nan"), 4.0])
    log.add(LossTerms(loss=mse, t=t, is_bank=is_bank, terms={"mse": mse}))
    out = log.flush(_OneProcess(), n_bank=1, bank_weight=1.0)
    assert out["loss/target"] == 1.0 and out["loss/bank"] == 4.0
    assert out["non_finite_samples"] == 1.0
    assert "mse_by_t/target_q3" not in out  # its only sample was NaN


def test_term_log_refuses_terms_that_change_between_steps() -> None:
    from difftune.objectives.term_log import TermLog

    log = TermLog(T)
    t, is_bank, x = torch.tensor([1, 900]), torch.tensor([False, True]), torch.ones(2)
    log.add(LossTerms(loss=x, t=t, is_bank=is_bank, terms={"mse": x, "vb": x}))
    with pytest.raises(ValueError, match=r"terms \['vb', 'mse'\] after \['mse', 'vb'\]"):
        log.add(LossTerms(loss=x, t=t, is_bank=is_bank, terms={"vb": x, "mse": x}))
