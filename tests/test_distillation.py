"""Distillation-based retention, the retention stream on target data, and ``difftune export``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file

from difftune.backbones import Conditioning, apply_tuning, load_pretrained, load_trained, merged_model
from difftune.cli import main
from difftune.config.experiment import ConfigError, ObjectiveConfig, load_config
from difftune.config.objective import DistillationSettings
from difftune.objectives import DiffTuningLoss, DistillationLoss, build_objective
from difftune.process import build_process
from difftune.training.loop import Trainer
from difftune.tuning import adapters_off
from test_peft import _perturb
from test_training import make_cfg, metrics, weights


def _batch(loaded, n: int = 6, bank: int = 2):
    objective = build_objective(
        ObjectiveConfig(kind="distillation"),
        build_process(loaded.scheduler_config),
        loaded.backbone,
    )
    g = torch.Generator().manual_seed(0)
    draw = objective.draw(n - bank, bank, loaded.backbone.sample_shape, g)
    x0 = torch.randn((n, *loaded.backbone.sample_shape), generator=g)
    cond = Conditioning.cat(
        [Conditioning({"labels": torch.arange(n - bank)}), loaded.backbone.unconditional(bank)]
    )
    return objective, x0, cond, draw.bank.clone(), draw


def test_distillation_is_zero_at_the_start_and_matches_diff_tuning_on_target_rows(dit_dir: Path) -> None:
    loaded = load_pretrained(str(dit_dir))
    params = apply_tuning(loaded, "lora")
    loaded.backbone.eval()
    objective, x0, cond, is_bank, draw = _batch(loaded)
    assert isinstance(objective, DistillationLoss)
    terms = objective(loaded.backbone, x0, cond, is_bank, draw)
    # the student is the teacher at the start (up to the rounding of a 6-row vs a 2-row forward pass)
    assert terms.terms["distill"].max() < 1e-10
    plain = DiffTuningLoss.__call__(objective, loaded.backbone, x0, cond, is_bank, draw)
    target = ~is_bank
    assert torch.equal(terms.loss[target], plain.loss[target])
    assert torch.equal(terms.terms["mse"][is_bank], torch.zeros(2))  # retention rows: distillation only

    _perturb(params)
    terms = objective(loaded.backbone, x0, cond, is_bank, draw)
    assert (terms.terms["distill"][is_bank] > 0).all() and (terms.terms["distill"][target] == 0).all()
    # the teacher is the pre-trained function: the distance is to the switched-off model's output
    with torch.no_grad():
        x_t, t, _ = objective.noised(x0, draw)
        rows = is_bank.nonzero().flatten()
        with adapters_off(loaded.backbone):
            reference = loaded.backbone(x_t[rows], t[rows], cond.select(rows))
        student = loaded.backbone(x_t[rows], t[rows], cond.select(rows))
    expected = (student - reference).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(terms.terms["distill"][is_bank], expected, rtol=1e-4, atol=1e-9)
    terms.loss.sum().backward()
    assert all(p.grad is not None for p in params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_tuning_distils_from_a_frozen_copy(dtype: str, dit_dir: Path) -> None:
    loaded = load_pretrained(str(dit_dir))
    apply_tuning(loaded, "full")
    loaded.backbone.eval()
    objective = build_objective(
        ObjectiveConfig(kind="distillation", distillation=DistillationSettings(teacher_dtype=dtype)),
        build_process(loaded.scheduler_config),
        loaded.backbone,
    )
    _, x0, cond, _, draw = _batch(loaded)
    x_t, t, _ = objective.noised(x0, draw)
    with torch.no_grad():
        before = loaded.backbone(x_t, t, cond)
        for p in loaded.backbone.parameters():
            p.add_(0.05)
        taught = objective.teacher(x_t, t, cond)
    if dtype == "float32":
        assert torch.equal(taught, before)  # the weights as they were when the objective was built
    else:
        torch.testing.assert_close(taught, before, atol=0.05, rtol=0.05)
        assert not torch.equal(taught, before)


def test_lora_distillation_on_target_data_trains_without_a_bank(dit_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = make_cfg(
        dit_dir,
        run,
        None,
        "tuning.method=lora",
        "objective.kind=distillation",
        "objective.retention_data=target",
        "objective.bank_share=0.2",
        "train.learning_rate=1e-2",
    )
    assert cfg.bank_count == 2 and not cfg.uses_bank
    final = Trainer(cfg).train()
    logged = metrics(run)
    assert all(m["distill_by_t/bank_q1"] >= 0 for m in logged if "distill_by_t/bank_q1" in m)
    assert any(
        m.get("distill_by_t/bank_q1", 0) > 0 or m.get("distill_by_t/bank_q2", 0) > 0 for m in logged[1:]
    )
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["retention"] == {"objective": "distillation", "data": "target"}
    assert (final / "adapter" / "difftune_adapter.safetensors").is_file()


def test_distillation_trains_micro_batches_without_retention_rows(dit_dir: Path, tmp_path: Path) -> None:
    # 8 target + 2 retention rows in 5 micro-batches of 2 (rows i and i + 5): three hold no retention row
    common = (
        "tuning.method=lora",
        "objective.kind=distillation",
        "objective.retention_data=target",
        "objective.bank_share=0.2",
        "train.learning_rate=1e-2",
        "train.max_steps=2",
        "train.checkpoint_every=0",
    )
    one = Trainer(make_cfg(dit_dir, tmp_path / "acc1", None, *common)).train()
    five = Trainer(
        make_cfg(dit_dir, tmp_path / "acc5", None, *common, "train.gradient_accumulation=5")
    ).train()
    adapter = "adapter/difftune_adapter.safetensors"
    a, b = load_file(str(one / adapter)), load_file(str(five / adapter))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    for m1, m5 in zip(metrics(tmp_path / "acc1"), metrics(tmp_path / "acc5"), strict=True):
        assert m1.keys() == m5.keys()
        for key in m1:  # micro-batches sum in another order: a bucket near 6e-5 moves by ~1e-9 on some CPUs
            assert m1[key] == pytest.approx(m5[key], rel=1e-5, abs=1e-8), key


def test_full_tuning_distillation_resumes_from_the_pre_trained_teacher(dit_dir: Path, tmp_path: Path) -> None:
    """The frozen copy is the pre-trained model in a resumed run too, not the restored checkpoint's."""
    common = (
        "objective.kind=distillation",
        "objective.retention_data=target",
        "objective.bank_share=0.2",
        "train.learning_rate=1e-2",
        "train.checkpoint_every=2",
    )
    whole = Trainer(make_cfg(dit_dir, tmp_path / "whole", None, *common)).train()
    Trainer(make_cfg(dit_dir, tmp_path / "cut", None, *common, "train.max_steps=2")).train()
    resumed = Trainer(make_cfg(dit_dir, tmp_path / "cut", None, *common, "train.resume=latest")).train()
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_retention_settings_are_checked() -> None:
    with pytest.raises(
        ConfigError, match=r"objective.retention_data='bnak': use one of \['bank', 'target'\]"
    ):
        ObjectiveConfig(retention_data="bnak")
    with pytest.raises(ConfigError, match="objective.distillation.teacher_dtype='int8'"):
        ObjectiveConfig(distillation=DistillationSettings(teacher_dtype="int8"))
    with pytest.raises(ConfigError, match="bank.path is empty"):
        load_config(None, ["model.pretrained=x/y", "data.source=digits"])
    cfg = load_config(None, ["model.pretrained=x/y", "data.source=digits", "objective.retention_data=target"])
    assert cfg.bank_count > 0 and not cfg.uses_bank


def _lora_run(dit_dir: Path, tmp_path: Path) -> Path:
    cfg = make_cfg(dit_dir, tmp_path / "run", None, "tuning.method=lora", "train.learning_rate=1e-2")
    return Trainer(cfg).train()


def test_export_merge_writes_a_stock_model(dit_dir: Path, tmp_path: Path, capsys) -> None:
    final = _lora_run(dit_dir, tmp_path)
    out = tmp_path / "merged"
    assert main(["export", str(final), "--out", str(out), "--merge"]) == 0
    stock = DiTTransformer2DModel.from_pretrained(str(out), subfolder="transformer").eval()
    tuned = load_trained(str(final))
    expected = merged_model(tuned.backbone.inner).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.equal(
            stock(x, timestep=t, class_labels=y).sample, expected(x, timestep=t, class_labels=y).sample
        )
    assert json.loads((out / "class_names.json").read_text()) == ["5", "6", "7", "8", "9"]

    assert main(["export", str(final), "--out", str(out), "--merge"]) == 2  # not empty
    assert "is not empty" in capsys.readouterr().err


def test_export_without_merge_is_the_adapter_alone(dit_dir: Path, tmp_path: Path) -> None:
    final = _lora_run(dit_dir, tmp_path)
    out = tmp_path / "adapter"
    assert main(["export", str(final), "--out", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file()  # peft's format, for peft's loader
    exported, original = load_trained(str(out)), load_trained(str(final))  # both the EMA adapter
    a = dict(exported.backbone.inner.named_parameters())
    for name, p in original.backbone.inner.named_parameters():
        assert torch.equal(p, a[name]), name


def test_export_refuses_a_full_model(dit_dir: Path, tmp_path: Path, capsys) -> None:
    final = Trainer(make_cfg(dit_dir, tmp_path / "run", None)).train()
    assert main(["export", str(final), "--out", str(tmp_path / "x"), "--merge"]) == 2
    assert "holds no adapter" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_paths_that_cannot_work_are_one_line(dit_dir: Path, tmp_path: Path, capsys) -> None:
    final = _lora_run(dit_dir, tmp_path)
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "missing is not a directory; give a run's final/" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("keep me")
    assert main(["export", str(final), "--out", str(tmp_path / "a-file"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert err.count("difftune: error:") == 1 and "is a file; give a folder" in err
    assert (tmp_path / "a-file").read_text() == "keep me"
