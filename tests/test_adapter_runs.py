"""Adapter runs in the situations real runs meet: a knowledge bank, a base in a sub-folder, training further."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from difftune.backbones import load_pretrained, load_trained
from difftune.backbones.adapters import TUNING_FILE
from difftune.bank import generate_bank
from difftune.errors import UserError
from difftune.testing.models import save_pipeline_dir, tiny_dit
from difftune.training.loop import Trainer
from test_training import make_cfg, metrics

LORA = ("tuning.method=lora", "train.learning_rate=1e-2")


def _output(loaded) -> torch.Tensor:
    from difftune.backbones import Conditioning

    loaded.backbone.eval()
    x, t = (
        torch.randn(2, *loaded.backbone.sample_shape, generator=torch.Generator().manual_seed(0)),
        torch.tensor([5, 600]),
    )
    with torch.no_grad():
        return loaded.backbone(x, t, Conditioning({"labels": torch.tensor([0, 3])}))


def test_diff_tuning_with_a_bank_accepts_the_bank_of_the_base(dit_dir: Path, tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    cfg = make_cfg(dit_dir, tmp_path / "run", bank, *LORA)
    generate_bank(load_pretrained(str(dit_dir)), cfg.bank, progress=False)
    final = Trainer(cfg).train()  # the bank records the base's fingerprint, not the adapted model's
    assert any("loss/bank" in m for m in metrics(tmp_path / "run"))
    assert (final / "adapter").is_dir()


def test_an_adapter_on_a_base_in_a_sub_folder_reloads_onto_that_base(dit_dir: Path, tmp_path: Path) -> None:
    full = Trainer(
        make_cfg(dit_dir, tmp_path / "full", None, "train.learning_rate=1e-2", "train.ema_decay=0.5")
    ).train()
    ema_base = load_pretrained(str(full), subfolder="ema/transformer")
    assert not torch.equal(_output(ema_base), _output(load_pretrained(str(full), subfolder="transformer")))
    cfg = make_cfg(ema_base.weights[0], tmp_path / "lora", None, *LORA, "model.subfolder=ema/transformer")
    trainer = Trainer(cfg)
    final = trainer.train()
    reloaded = load_trained(str(final), use_ema=False)
    assert reloaded.weights == (str(full.resolve()), "ema/transformer")
    assert torch.equal(_output(reloaded), _output(trainer.loaded))


def test_an_adapter_trains_further_from_its_own_weights(dit_dir: Path, tmp_path: Path) -> None:
    first = Trainer(make_cfg(dit_dir, tmp_path / "first", None, *LORA)).train()
    trainer = Trainer(make_cfg(first, tmp_path / "second", None, *LORA, "train.max_steps=1"))
    start = {
        n: p.detach().clone() for n, p in trainer.loaded.backbone.inner.named_parameters() if p.requires_grad
    }
    trained = load_trained(str(first), use_ema=False).backbone.inner
    assert all(
        torch.equal(start[n], p) for n, p in trained.named_parameters() if n in start
    )  # the live weights
    second = trainer.train()
    assert (
        load_trained(str(second)).tuning.base_fingerprint == load_trained(str(first)).tuning.base_fingerprint
    )
    with pytest.raises(UserError, match="holds a lora adapter.*tuning.method=lora"):
        Trainer(make_cfg(first, tmp_path / "third", None, "tuning.method=bitfit"))


def test_a_run_moved_with_its_base_finds_the_base_beside_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    project = tmp_path / "project"
    base = save_pipeline_dir(project / "base", tiny_dit(), "transformer")
    final = Trainer(make_cfg(base, project / "run", None, *LORA, "train.max_steps=1")).train()
    before = _output(load_trained(str(final)))
    record = json.loads((final / "ema" / "adapter" / TUNING_FILE).read_text())
    assert record["base"]["relative"] == {"source": "base"}

    moved = tmp_path / "moved"
    project.rename(moved)
    with caplog.at_level("WARNING", logger="difftune.backbones.adapters"):
        assert torch.equal(_output(load_trained(str(moved / "run" / "final"))), before)
    assert any(f"no longer at {base.resolve()}" in r.getMessage() for r in caplog.records)

    shutil.rmtree(moved / "base")
    with pytest.raises(
        UserError, match=r"fingerprint .* is no longer at .*project/base, nor at base in a folder above"
    ):
        load_trained(str(moved / "run" / "final"))
