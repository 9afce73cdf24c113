"""``objective.bank_curriculum``: the bank's share of each step's batch over training (tiny DiT, CPU)."""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import test_training
from difftune.config.checks import ConfigError
from difftune.config.experiment import config_from_dict
from difftune.objectives.base import LossTerms
from difftune.objectives.term_log import TermLog
from difftune.training.curriculum import bank_share_at, bank_weight_at, step_counts
from difftune.training.loop import Trainer
from test_objectives import _loss
from test_training import assert_all_equal, loop_state, make_cfg, metrics, weights

dit_bank = test_training.dit_bank  # the fixture: the tiny DiT's knowledge bank

# bank_share 0.5 of a batch of 8: every share below is exact in binary, so the counts are exact too
CURRICULUM = [
    "train.batch_size=8",
    "objective.bank_share=0.5",
    "objective.bank_curriculum.start_step=2",
    "objective.bank_curriculum.warmup_steps=2",
    "objective.bank_curriculum.end_step=7",
    "objective.bank_curriculum.anneal_steps=2",
]
# steps 0-7: nothing before start_step 2, the ramp 0 -> 0.25 -> 0.5 (steps 2-4), held, the anneal from
# 0.5 toward 0 at end_step 7 (steps 5-6), nothing from step 7 on
SHARES = [0.0, 0.0, 0.0, 0.25, 0.5, 0.5, 0.25, 0.0]


def test_default_curriculum_is_the_constant_share(dit_dir: Path, tmp_path: Path) -> None:
    for share in (0.05, 0.1, 0.2, 0.25, 0.3, 0.35, 0.7, 0.9):
        for batch in (3, 7, 10, 32, 256, 1000):
            if int(share * batch) == 0:  # refused: no bank sample in any batch
                continue
            extra = [f"objective.bank_share={share}", f"train.batch_size={batch}"]
            cfg = make_cfg(dit_dir, tmp_path, tmp_path / "bank", *extra)
            for step in (0, 1, 17, 10**6):
                assert bank_share_at(cfg.objective, step) == share
                assert step_counts(cfg, step) == (batch - cfg.bank_count, cfg.bank_count)
                assert bank_weight_at(cfg.objective, step) == cfg.objective.bank_weight


def test_curriculum_shares_weights_and_counts(dit_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(
        dit_dir, tmp_path, tmp_path / "bank", *CURRICULUM, "objective.bank_curriculum.scale_weight=true"
    )
    assert [bank_share_at(cfg.objective, k) for k in range(10)] == [*SHARES, 0.0, 0.0]
    assert [step_counts(cfg, k) for k in range(8)] == [(8 - round(8 * r), round(8 * r)) for r in SHARES]
    assert bank_weight_at(cfg.objective, 3) == pytest.approx(cfg.objective.bank_weight / 2)
    assert bank_weight_at(cfg.objective, 4) == cfg.objective.bank_weight  # exactly lambda at the full share
    assert bank_weight_at(cfg.objective, 0) == 0.0

    # an anneal toward final_share: the line from bank_share at end - anneal to final_share at end_step
    anneal = [
        "train.batch_size=8",
        "objective.bank_share=0.5",
        "objective.bank_curriculum.end_step=8",
        "objective.bank_curriculum.anneal_steps=4",
        "objective.bank_curriculum.final_share=0.25",
    ]
    cfg = make_cfg(dit_dir, tmp_path, tmp_path / "bank", *anneal)
    shares = [bank_share_at(cfg.objective, k) for k in range(3, 10)]
    assert shares == [0.5, 0.5, 0.4375, 0.375, 0.3125, 0.0, 0.0]
    assert [step_counts(cfg, k)[1] for k in range(3, 10)] == [4, 4, 3, 3, 2, 0, 0]


def test_default_run_is_bitwise_today_s(dit_dir: Path, dit_bank: Path, tmp_path: Path) -> None:
    """A curriculum that never leaves the full share (its end after the run, λ scaled by 1) trains the
    same weights, logs the same losses and consumes the same samples as a run without the key."""
    plain = Trainer(make_cfg(dit_dir, tmp_path / "a", dit_bank)).train()
    held = make_cfg(
        dit_dir,
        tmp_path / "b",
        dit_bank,
        "objective.bank_curriculum.end_step=100",
        "objective.bank_curriculum.scale_weight=true",
    )
    assert held.objective.bank_curriculum.end_step == 100
    assert_all_equal(weights(plain), weights(Trainer(held).train()))
    assert_all_equal(weights(plain, "ema/transformer"), weights(tmp_path / "b" / "final", "ema/transformer"))
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert all(m["bank/share"] == 0.2 for m in metrics(tmp_path / "a"))  # 2 of 10 at every step
    step = "checkpoint-0000004"
    assert loop_state(tmp_path / "a" / "checkpoints" / step) == loop_state(
        tmp_path / "b" / "checkpoints" / step
    )


def test_curriculum_run_logs_its_share_per_step(dit_dir: Path, dit_bank: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(make_cfg(dit_dir, run, dit_bank, *CURRICULUM, "train.max_steps=8")).train()
    history = metrics(run)
    assert [m["step"] for m in history] == list(range(1, 9))
    assert [m["bank/share"] for m in history] == SHARES  # step k is logged as step k + 1
    for m, share in zip(history, SHARES, strict=True):
        assert 0 <= m["t_mean/target"] < 1000
        if share == 0:  # an all-target batch: no bank loss, no bank t, the total is the target loss
            assert "loss/bank" not in m and "t_mean/bank" not in m
            assert not any(k.endswith(("/bank_q1", "/bank_q2", "/bank_q3", "/bank_q4")) for k in m)
            assert m["loss/total"] == m["loss/target"]
        else:
            assert math.isfinite(m["loss/bank"]) and 0 <= m["t_mean/bank"] < 1000
            assert m["loss/total"] == pytest.approx(m["loss/target"] + 0.1 * m["loss/bank"])
    # the bank stream gave exactly the samples the steps used: 2 + 4 + 4 + 2 of its 20; the target
    # stream the rest: 64 - 12 = 52 of 20 per epoch
    assert loop_state(run / "checkpoints" / "checkpoint-0000008") == {
        "step": 8,
        "target": {"size": 20, "seed": 0, "epoch": 2, "offset": 12},
        "bank": {"size": 20, "seed": 1, "epoch": 0, "offset": 12},
    }


def test_resume_across_a_change_of_phase_is_exact(dit_dir: Path, dit_bank: Path, tmp_path: Path) -> None:
    """Interrupted in the ramp (after step 3, whose batch held 2 bank samples), resumed through the hold,
    the anneal and the end: the weights and the history of an uninterrupted run."""
    a, b = tmp_path / "a", tmp_path / "b"
    scaled = [*CURRICULUM, "objective.bank_curriculum.scale_weight=true", "train.checkpoint_every=4"]
    final_a = Trainer(make_cfg(dit_dir, a, dit_bank, *scaled, "train.max_steps=8")).train()
    Trainer(make_cfg(dit_dir, b, dit_bank, *scaled, "train.max_steps=4")).train()
    assert loop_state(b / "checkpoints" / "checkpoint-0000004")["bank"]["offset"] == 2
    resumed = Trainer(make_cfg(dit_dir, b, dit_bank, *scaled, "train.max_steps=8", "train.resume=latest"))
    final_b = resumed.train()
    assert resumed.state.step == 8
    assert_all_equal(weights(final_a), weights(final_b))
    assert_all_equal(weights(final_a, "ema/transformer"), weights(final_b, "ema/transformer"))
    assert metrics(a) == metrics(b)
    assert [m["bank/share"] for m in metrics(b)] == SHARES


def test_term_log_with_an_empty_bank_stream_since_the_last_flush() -> None:
    log = TermLog(1000)
    t, is_bank, mse = torch.tensor([100, 300]), torch.tensor([False, False]), torch.tensor([1.0, 3.0])
    log.add(LossTerms(loss=mse, t=t, is_bank=is_bank, terms={"mse": mse}))
    out = log.flush(_OneProcess(), n_bank=2, bank_weight=0.1)
    assert out["loss/total"] == out["loss/target"] == 2.0
    assert out["bank/share"] == 0.0 and out["t_mean/target"] == 200.0
    assert "loss/bank" not in out and "t_mean/bank" not in out
    log.add(LossTerms(loss=mse, t=t, is_bank=torch.tensor([False, True]), terms={"mse": mse}))
    out = log.flush(_OneProcess(), n_bank=2, bank_weight=0.1)
    assert out["bank/share"] == 0.5 and out["t_mean/bank"] == 300.0 and out["loss/bank"] == 3.0
    assert out["loss/total"] == pytest.approx(1.0 + 0.1 * 3.0)


def test_reduce_takes_the_step_s_bank_weight() -> None:
    objective = _loss(bank_weight=0.1)
    loss = torch.tensor([1.0, 3.0, 10.0])
    terms = LossTerms(
        loss=loss, t=torch.zeros(3, dtype=torch.long), is_bank=torch.tensor([False, False, True])
    )
    assert objective.reduce(terms, 2, 1).item() == pytest.approx(2.0 + 1.0)
    assert objective.reduce(terms, 2, 1, 0.05).item() == pytest.approx(2.0 + 0.5)
    assert objective.reduce(terms, 2, 1, 0.0).item() == 2.0


class _OneProcess:
    num_processes = 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["objective.bank_curriculum.start_step=-1"], r"start_step=-1 must be >= 0"),
        (["objective.bank_curriculum.warmup_steps=-5"], r"warmup_steps=-5 must be >= 0"),
        (["objective.bank_curriculum.end_step=-2"], r"end_step=-2 must be >= 0"),
        (
            ["objective.bank_curriculum.start_step=10", "objective.bank_curriculum.end_step=4"],
            r"end_step=4 must be after start_step=10",
        ),
        (
            ["objective.bank_curriculum.final_share=0.3"],
            r"final_share=0.3 must be in \[0, objective.bank_share=0.2\]",
        ),
        (["objective.bank_curriculum.final_share=-0.1"], r"final_share=-0.1 must be in \[0"),
        (["objective.bank_curriculum.anneal_steps=3"], r"anneal_steps=3 ends at end_step, which is null"),
        (
            [
                "objective.bank_curriculum.warmup_steps=6",
                "objective.bank_curriculum.end_step=10",
                "objective.bank_curriculum.anneal_steps=5",
            ],
            r"warm-up \(start_step \+ warmup_steps = 6\) must end before the anneal starts \(.* = 5\)",
        ),
        (
            ["objective.bank_share=0", "objective.bank_curriculum.start_step=5"],
            r"objective.bank_curriculum shapes the bank's share, and objective.bank_share=0 gives it none",
        ),
        (["objective.bank_curriculum.start_step=1.5"], r"objective.bank_curriculum.start_step=1.5"),
    ],
)
def test_invalid_curriculum_refused_in_one_line(
    dit_dir: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        make_cfg(dit_dir, tmp_path, tmp_path / "bank", *extra)
    assert "\n" not in str(err.value)


def test_the_readme_example_is_a_valid_curriculum() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text[text.index("`objective.bank_curriculum`: the bank's share") :]
    block = re.search(r"```yaml\n(.*?)\n *```", after, re.S).group(1)  # indented in its list item
    raw = yaml.safe_load(textwrap.dedent(block))
    sections = {"model": {"pretrained": "x/y"}, "data": {"source": "digits"}, "bank": {"path": "bank"}}
    cfg = config_from_dict({**raw, **sections})
    c = cfg.objective.bank_curriculum
    assert (c.start_step, c.warmup_steps, c.end_step, c.anneal_steps) == (1000, 500, 20000, 2000)
    assert bank_share_at(cfg.objective, 999) == 0.0 and bank_share_at(cfg.objective, 1250) == 0.1
    assert bank_share_at(cfg.objective, 10000) == 0.2 and bank_share_at(cfg.objective, 20000) == 0.0
