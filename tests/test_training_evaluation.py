"""Training-time evaluation (train.eval_every) and train.keep_best, on the tiny DiT of test_training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from difftune.backbones import load_pretrained
from difftune.bank import generate_bank
from difftune.config.experiment import ConfigError
from difftune.errors import UserError
from difftune.training.loop import Trainer
from test_training import make_cfg, metrics, weights

EVAL = ("train.eval_every=2", "train.evaluation.bins=3")


class MeanPixels(nn.Module):
    """A feature extractor for the tests: 4x4 average-pooled grey pixels (16 features)."""

    num_features = 16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grey = images.mean(dim=1, keepdim=True)
        return nn.functional.adaptive_avg_pool2d(grey, 4).flatten(1)


def mean_pixels() -> nn.Module:
    return MeanPixels()


@pytest.fixture
def bank(dit_dir: Path, tmp_path: Path) -> Path:
    cfg = make_cfg(dit_dir, tmp_path / "unused", tmp_path / "bank")
    generate_bank(load_pretrained(str(dit_dir)), cfg.bank, progress=False)
    return tmp_path / "bank"


def evaluations(run: Path) -> list[dict]:
    return [row for row in metrics(run) if any(key.startswith("eval/") for key in row)]


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (("train.keep_best=loss",), "set train.eval_every"),
        (("train.eval_every=2", "train.keep_best=loss"), "set train.evaluation.holdout"),
        (("train.eval_every=2", "train.keep_best=fid"), "needs train.evaluation.features"),
        (("train.evaluation.holdout=3",), "train.eval_every=0"),
        (("train.eval_every=2", "train.evaluation.features=inception"), "train.evaluation.samples=0"),
        (("train.eval_every=2", "train.evaluation.bank_holdout=3"), "bank.path is empty"),
        (("train.eval_every=-1",), "train.eval_every=-1 must be >= 0"),
        (("train.eval_every=2", "train.keep_best=best"), "train.keep_best='best'"),
    ],
)
def test_bad_evaluation_settings_are_refused(extra: tuple[str, ...], problem: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        make_cfg(tmp_path / "model", tmp_path / "run", None, *extra)


def test_a_hold_out_of_the_whole_set_is_refused(dit_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(dit_dir, tmp_path / "run", None, *EVAL, "train.evaluation.holdout=20")
    with pytest.raises(UserError, match="holdout=20 holds out the whole set of 20"):
        Trainer(cfg)


def test_evaluations_hold_out_their_samples_and_log_at_fixed_steps(
    dit_dir: Path, bank: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = make_cfg(
        dit_dir,
        run,
        bank,
        *EVAL,
        "train.max_steps=5",
        "train.evaluation.holdout=5",
        "train.evaluation.bank_holdout=4",
    )
    trainer = Trainer(cfg)
    assert trainer.n_target + trainer.n_bank == 10
    assert len(trainer.target) == 15  # 20 digits, 5 held out
    assert trainer.bank.shape[0] == 16  # 20 bank samples, 4 held out
    assert trainer.state.bank is not None and trainer.state.bank.size == 16
    trainer.train()
    rows = evaluations(run)
    assert [row["step"] for row in rows] == [0, 2, 4, 5]  # step 0, every 2, and the last
    for row in rows:
        for name in ("target", "bank"):
            bins = [key for key in row if key.startswith(f"eval/loss/{name}/")]
            assert bins == [
                f"eval/loss/{name}/t0-332",
                f"eval/loss/{name}/t333-666",
                f"eval/loss/{name}/t667-999",
            ]
            assert row[f"eval/loss/{name}"] == pytest.approx(sum(row[key] for key in bins) / 3)
    assert not (run / "best").exists()  # no keep_best


def test_the_same_weights_score_the_same(dit_dir: Path, bank: Path, tmp_path: Path) -> None:
    cfg = make_cfg(
        dit_dir,
        tmp_path / "run",
        bank,
        *EVAL,
        "train.evaluation.holdout=5",
        "train.evaluation.samples=6",
        f"train.evaluation.features={__name__}:mean_pixels",
    )
    trainer = Trainer(cfg)
    evaluation = trainer.parts.evaluation
    assert evaluation is not None
    first = evaluation.evaluate(trainer.backbone, "cpu")
    again = evaluation.evaluate(trainer.backbone, "cpu")
    assert first == again
    assert {"eval/fid", "eval/kid", "eval/forgetting", "eval/forgetting_fid"} <= set(first)
    # the pre-trained model regenerates its own bank from the bank's seeds: nothing is forgotten yet
    assert first["eval/forgetting"] < 1e-10
    assert first["eval/forgetting_fid"] == pytest.approx(0.0, abs=1e-6)
    assert trainer.backbone.training  # the mode is restored


def test_forgetting_grows_as_the_model_moves_away(dit_dir: Path, bank: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = make_cfg(
        dit_dir,
        run,
        bank,
        *EVAL,
        "train.max_steps=4",
        "train.ema_decay=0",
        "train.learning_rate=3e-3",
        "train.evaluation.samples=4",
    )
    Trainer(cfg).train()
    forgetting = [row["eval/forgetting"] for row in evaluations(run)]
    assert forgetting[0] < 1e-10
    assert forgetting[-1] > 1e-4
    assert forgetting[-1] > forgetting[1] > forgetting[0]


def test_keep_best_keeps_the_lowest_loss_and_loads(dit_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = make_cfg(
        dit_dir,
        run,
        None,
        "train.eval_every=1",
        "train.evaluation.bins=2",
        "train.keep_best=loss",
        "train.evaluation.holdout=5",
        "train.max_steps=4",
        "train.ema_decay=0",
        "train.learning_rate=3e-3",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=10",
    )
    Trainer(cfg).train()
    rows = evaluations(run)
    losses = {row["step"]: row["eval/loss/target"] for row in rows}
    best_step = min(losses, key=losses.get)
    record = json.loads((run / "best" / "best.json").read_text())
    assert record["metric"] == "loss" and record["step"] == best_step
    assert record["score"] == losses[best_step]
    if best_step == 0:
        expected = weights(Path(cfg.model.pretrained))
    else:
        expected = weights(run / "checkpoints" / f"checkpoint-{best_step:07d}" / "model")
    got = weights(run / "best")
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    assert load_pretrained(str(run / "best")).backbone is not None  # a model folder, as final/ is


def test_resumed_run_evaluates_and_keeps_best_as_an_uninterrupted_one(
    dit_dir: Path, bank: Path, tmp_path: Path
) -> None:
    settings = (
        *EVAL,
        "train.keep_best=forgetting",
        "train.evaluation.samples=4",
        "train.evaluation.holdout=4",
        "train.ema_decay=0.5",
    )
    straight, resumed = tmp_path / "a", tmp_path / "b"
    Trainer(make_cfg(dit_dir, straight, bank, *settings)).train()
    Trainer(make_cfg(dit_dir, resumed, bank, *settings, "train.max_steps=2")).train()
    Trainer(make_cfg(dit_dir, resumed, bank, *settings, "train.resume=latest")).train()
    assert evaluations(resumed) == evaluations(straight)
    a, b = (json.loads((r / "best" / "best.json").read_text()) for r in (straight, resumed))
    assert a == b


def test_a_fresh_run_drops_an_earlier_runs_best(dit_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    settings = ("train.eval_every=2", "train.keep_best=loss", "train.evaluation.holdout=4")
    Trainer(make_cfg(dit_dir, run, None, *settings)).train()
    assert (run / "best").is_dir()
    Trainer(make_cfg(dit_dir, run, None, "train.overwrite=true")).train()
    assert not (run / "best").exists()
    assert evaluations(run) == []


def test_dry_run_states_the_evaluation_and_checks_the_bank_a_plain_run_evaluates_on(
    dit_dir: Path, bank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from difftune.cli import main
    from test_training import overrides

    settings = (
        *EVAL,
        "train.evaluation.holdout=5",
        "train.evaluation.samples=4",
        "train.keep_best=forgetting",
    )
    plain = [*overrides(dit_dir, tmp_path / "run", bank, *settings), "objective.bank_share=0"]
    assert main(["train", "--dry-run", *(f"--set={item}" for item in plain)]) == 0
    out = capsys.readouterr().out
    assert "bank       20 samples from" in out  # read for the forgetting probe although not replayed
    assert (
        "evaluate   every 2 steps: loss of 5 held-out target images, forgetting on 4 bank samples; "
        "best/ by forgetting" in out
    )
    assert not (tmp_path / "run").exists()
    missing = [*plain, f"bank.path={tmp_path / 'no-bank'}"]
    assert main(["train", "--dry-run", *(f"--set={item}" for item in missing)]) == 2


def test_dry_run_refuses_missing_reference_statistics(
    dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from difftune.cli import main
    from test_training import overrides

    settings = [
        *overrides(dit_dir, tmp_path / "run", None, *EVAL),
        "objective.bank_share=0",
        "train.evaluation.samples=4",
        "train.evaluation.features=inception",
        f"train.evaluation.reference={tmp_path / 'stats.npz'}",
    ]
    assert main(["train", "--dry-run", *(f"--set={item}" for item in settings)]) == 2
    err = capsys.readouterr().err
    assert "train.evaluation.reference" in err and "does not exist" in err
