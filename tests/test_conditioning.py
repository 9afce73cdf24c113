"""The conditioning bundle, and how the trainer's batches route conditions through the backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difftune.backbones import Conditioning
from difftune.training.loop import Trainer
from test_training import make_cfg


def _bundle() -> Conditioning:
    return Conditioning({"labels": torch.tensor([3, 1, 3, 0]), "emb": torch.arange(8.0).view(4, 2)})


def test_bundle_select_cat_where() -> None:
    cond = _bundle()
    assert cond.batch_size == 4 and set(cond) == {"labels", "emb"}
    part = cond.select(torch.tensor([2, 0]))
    assert part["labels"].tolist() == [3, 3] and part["emb"].tolist() == [[4.0, 5.0], [0.0, 1.0]]
    both = Conditioning.cat([part, cond.select(slice(1, 2))])
    assert both["labels"].tolist() == [3, 3, 1] and both.batch_size == 3
    other = Conditioning({"labels": torch.full((4,), 9), "emb": torch.zeros(4, 2)})
    mixed = cond.where(torch.tensor([True, False, False, True]), other)
    assert mixed["labels"].tolist() == [9, 1, 3, 9]
    assert mixed["emb"].tolist() == [[0.0, 0.0], [2.0, 3.0], [4.0, 5.0], [0.0, 0.0]]
    assert cond["labels"].tolist() == [3, 1, 3, 0]  # nothing in place


def test_bundle_distinct_sorts_and_keeps_first_rows() -> None:
    cond = Conditioning({"labels": torch.tensor([4, 2, 4, 0, 2, 1])})
    assert cond.distinct()["labels"].tolist() == [0, 1, 2, 4]


def test_bundle_refuses_mismatched_batches_and_names() -> None:
    with pytest.raises(ValueError, match="share their batch dimension"):
        Conditioning({"labels": torch.zeros(3), "emb": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="different names"):
        Conditioning.cat([Conditioning({"a": torch.zeros(1)}), Conditioning({"b": torch.zeros(1)})])


def test_batch_routes_bank_rows_and_dropped_rows_to_the_unconditional_form(
    dit_dir: Path, tmp_path: Path
) -> None:
    from difftune.backbones import load_pretrained
    from difftune.bank import generate_bank
    from difftune.objectives import build_objective

    bank = tmp_path / "bank"
    cfg = make_cfg(dit_dir, tmp_path / "run", bank, "objective.cfg_dropout=0.5")
    generate_bank(load_pretrained(str(dit_dir)), cfg.bank, progress=False)
    trainer = Trainer(cfg)
    objective = build_objective(cfg.objective, trainer.process, trainer.backbone)
    null = trainer.backbone.null_label
    seen_drop = False
    for step in range(4):
        positions = trainer.state.target.state_dict()
        x0, cond, is_bank, draw = trainer.parts.batch(step, objective)
        trainer.state.target.load_state_dict(positions)
        idx = trainer.state.target.take(trainer.n_target)
        labels = cond["labels"]
        assert is_bank.tolist() == [False] * 8 + [True] * 2
        assert (labels[is_bank] == null).all()  # the bank trains the unconditional branch
        expected = torch.where(draw.drop[:8], null, trainer.target.cond["labels"][idx])
        assert torch.equal(labels[:8], expected)
        seen_drop |= bool(draw.drop[:8].any()) and bool((~draw.drop[:8]).any())
    assert seen_drop  # both kinds of target rows were checked


def test_a_bundle_without_tensors_keeps_its_batch_size() -> None:
    empty = Conditioning({}, batch_size=4)
    assert empty.batch_size == 4 and len(empty) == 0
    assert empty.select(torch.tensor([0, 2])).batch_size == 2 and empty.select(slice(1, 4)).batch_size == 3
    assert Conditioning.cat([empty, Conditioning({}, batch_size=3)]).batch_size == 7
    assert empty.where(torch.tensor([True, False, True, False]), empty).batch_size == 4
    assert empty.distinct().batch_size == 1
    with pytest.raises(ValueError, match="share their batch dimension"):
        Conditioning({})  # the size cannot be known
    with pytest.raises(ValueError, match="share their batch dimension"):
        Conditioning({"labels": torch.zeros(3)}, batch_size=2)
