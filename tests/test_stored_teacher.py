"""Distillation from teacher predictions stored in the knowledge bank (``objective.distillation.teacher: stored``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftune.backbones import Conditioning, LoadedModel, load_pretrained
from difftune.bank import generate_bank, load_bank
from difftune.bank.teacher_draws import SEED_OFFSET, draw_noise, teacher_draws
from difftune.cli import main
from difftune.config.experiment import ConfigError, ObjectiveConfig
from difftune.config.objective import DistillationSettings
from difftune.errors import UserError
from difftune.io.mapped import MappedRows
from difftune.io.store import LatentStore
from difftune.objectives import Draw, build_objective
from difftune.testing.models import save_pipeline_dir, tiny_dit
from difftune.training.loop import Trainer
from test_training import assert_all_equal, make_cfg, overrides, weights

STORED = ("objective.kind=distillation", "objective.distillation.teacher=stored")
K = 4


@pytest.fixture(scope="module")
def dit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class-conditional pixel DiT (learned variance: 2 output channels), shared by the module."""
    return save_pipeline_dir(tmp_path_factory.mktemp("stored") / "dit", tiny_dit(), "transformer")


@pytest.fixture(scope="module")
def bank(dit: Path) -> Path:
    """A 20-sample bank (3 shards of 8) with K=4 stored draws per sample."""
    cfg = make_cfg(dit, dit.parent / "unused", dit.parent / "bank", *STORED)
    loaded = load_pretrained(str(dit))
    generate_bank(loaded, cfg.bank, teacher=teacher_draws(cfg, loaded), progress=False)
    return dit.parent / "bank"


def _loaded(dit: Path) -> LoadedModel:
    loaded = load_pretrained(str(dit))
    loaded.backbone.eval()
    return loaded


def test_stored_predictions_are_the_frozen_models_at_the_stored_draws(dit: Path, bank: Path) -> None:
    loaded = _loaded(dit)
    stored = load_bank(bank, loaded)
    cfg = make_cfg(dit, dit.parent / "unused", bank, *STORED)
    draws = teacher_draws(cfg, loaded)
    assert stored["teacher_out"].shape == (20, K, 2, 8, 8) and stored["teacher_out"].dtype == torch.float32
    seeds = stored["seeds"][:, None] * K + torch.arange(K) + SEED_OFFSET
    assert torch.equal(stored["teacher_seed"], seeds)
    # t and the noise regenerate from each draw's seed: the noise is randn(shape) of a generator seeded with it
    t, noise = draws.timesteps(seeds.flatten(), (1, 8, 8))
    assert torch.equal(stored["teacher_t"].flatten(), t)
    assert torch.equal(draw_noise(seeds.flatten()[:5], (1, 8, 8)), noise[:5])
    # shard 0 (samples 0-7) recomputed in one forward pass like generation's: exactly equal in fp32
    rows = torch.arange(8).repeat_interleave(K)
    x_t = draws.process.noised(stored["samples"][rows], noise[: 8 * K], t[: 8 * K])
    cond = loaded.backbone.drop(
        Conditioning({"labels": stored["labels"][rows]}), torch.ones(8 * K, dtype=torch.bool)
    )
    with torch.no_grad():
        expected = loaded.backbone(*draws.process.model_input(x_t, t[: 8 * K]), cond)
    assert torch.equal(stored["teacher_out"][:8].flatten(0, 1), expected)
    # row 13, draw 2 alone (another batch composition: equal to float32 rounding)
    i = 13 * K + 2
    with torch.no_grad():
        one = loaded.backbone(
            *draws.process.model_input(
                draws.process.noised(stored["samples"][13:14], noise[i : i + 1], t[i : i + 1]), t[i : i + 1]
            ),
            loaded.backbone.unconditional(1),
        )
    torch.testing.assert_close(stored["teacher_out"][13, 2], one[0], rtol=1e-5, atol=1e-6)


def test_stored_timesteps_follow_xi(dit: Path) -> None:
    loaded = _loaded(dit)
    draws = teacher_draws(make_cfg(dit, dit.parent / "unused", dit.parent / "x", *STORED), loaded)
    assert draws.record["schedule"] == "power_down" and draws.record["axis"] == "index"
    t, _ = draws.timesteps(torch.arange(4000) + SEED_OFFSET, (1,))
    T = draws.process.num_timesteps
    probs = draws.schedule.probs()
    mean = float((probs * torch.arange(T)).sum())
    std = float((probs * (torch.arange(T) - mean) ** 2).sum().sqrt())
    # xi = power_down (mean ~T/3); 4 standard errors of a 4000-draw mean (~0.015 T): uniform (T/2) fails it
    assert abs(t.double().mean().item() - mean) < 4 * std / 4000**0.5
    assert abs(T / 2 - mean) > 8 * std / 4000**0.5


def test_a_stored_step_is_the_copy_step_at_the_same_draw(dit: Path, bank: Path, tmp_path: Path) -> None:
    cfg = make_cfg(dit, tmp_path / "run", bank, *STORED)
    parts = Trainer(cfg).parts
    stored = build_objective(parts.cfg.objective, parts.process, parts.backbone)
    copy_cfg = dataclasses.replace(parts.cfg.objective, distillation=DistillationSettings(teacher="copy"))
    copied = build_objective(copy_cfg, parts.process, parts.backbone)  # the frozen copy, taken now
    assert stored.teacher is None and copied.teacher is not None
    with torch.no_grad():
        for p in parts.backbone.parameters():  # the student moves away from the teacher
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x0, cond, is_bank, draw = parts.batch(0, stored)
    assert draw.reference is not None and is_bank.sum() == 2
    bank_rows = is_bank.nonzero().flatten()
    teacher = parts.bank_teacher
    assert isinstance(teacher.out, MappedRows)  # read from the bank's files a batch at a time
    # each bank row trains at one of its sample's stored draws, with that draw's prediction
    retained = [
        int(i) for i in range(len(teacher.t)) if any(torch.equal(x0[r], parts.bank[i]) for r in bank_rows)
    ]
    assert len(retained) == 2
    for r in bank_rows:
        i = next(i for i in retained if torch.equal(x0[r], parts.bank[i]))
        k = int((teacher.t[i] == draw.t[r]).nonzero()[0])
        assert torch.equal(draw.noise[r], draw_noise(teacher.seeds[i, k : k + 1], (1, 8, 8))[0])
        assert torch.equal(draw.reference[r], teacher.out[i][k])
    forced = Draw(draw.t, draw.noise, draw.drop, draw.bank)  # the copy computes its teacher at that draw
    a = stored(parts.backbone, x0, cond, is_bank, draw)
    b = copied(parts.backbone, x0, cond, is_bank, forced)
    assert (a.terms["distill"][is_bank] > 1e-6).all()
    torch.testing.assert_close(a.terms["distill"], b.terms["distill"], rtol=1e-4, atol=1e-9)
    assert torch.equal(a.terms["mse"], b.terms["mse"])


def test_a_stored_run_trains_without_a_copy_and_resumes_exactly(
    dit: Path, bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_copy(*args: object, **kwargs: object) -> None:
        raise AssertionError("teacher: stored must not copy the model")

    monkeypatch.setattr("difftune.objectives.distillation.frozen_copy", no_copy)
    monkeypatch.setattr("difftune.objectives.distillation.frozen_copy_teacher", no_copy)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    common = (*STORED, "train.checkpoint_every=2", "train.learning_rate=1e-2")
    final_a = Trainer(make_cfg(dit, run_a, bank, *common, "train.max_steps=4")).train()
    Trainer(make_cfg(dit, run_b, bank, *common, "train.max_steps=2")).train()
    final_b = Trainer(make_cfg(dit, run_b, bank, *common, "train.max_steps=4", "train.resume=latest")).train()
    assert_all_equal(weights(final_a), weights(final_b))
    assert not torch.equal(weights(final_a)["pos_embed.proj.weight"], weights(dit)["pos_embed.proj.weight"])


def test_generation_resumes_shard_by_shard(dit: Path, bank: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = make_cfg(dit, tmp_path / "unused", tmp_path / "bank", *STORED)
    loaded = _loaded(dit)
    original = LatentStore.write_shard

    def crash_after_one(self: LatentStore, index: int, tensors: dict[str, torch.Tensor]) -> None:
        if index != 0:
            raise RuntimeError("simulated crash")
        original(self, index, tensors)

    with monkeypatch.context() as m:
        m.setattr(LatentStore, "write_shard", crash_after_one)
        with pytest.raises(RuntimeError, match="simulated crash"):
            generate_bank(loaded, cfg.bank, teacher=teacher_draws(cfg, loaded), progress=False)
    assert LatentStore(tmp_path / "bank").missing_shards() == [1, 2]
    generate_bank(loaded, cfg.bank, teacher=teacher_draws(cfg, loaded), progress=False)
    for shard in range(3):  # each shard as the uninterrupted generation wrote it
        name = f"shard-0000{shard}.safetensors"
        assert_all_equal(load_file(str(tmp_path / "bank" / name)), load_file(str(bank / name)))
    assert LatentStore(tmp_path / "bank").manifest == LatentStore(bank).manifest
    # `difftune bank` with the training config writes the same bank
    sets = overrides(dit, tmp_path / "unused", tmp_path / "cli", *STORED)
    assert main(["bank", *(arg for item in sets for arg in ("--set", item))]) == 0
    for shard in range(3):
        name = f"shard-0000{shard}.safetensors"
        assert_all_equal(load_file(str(tmp_path / "cli" / name)), load_file(str(bank / name)))


def test_banks_and_settings_that_do_not_match_are_refused_in_one_line(
    dit: Path, bank: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plain = tmp_path / "plain"
    generate_bank(load_pretrained(str(dit)), make_cfg(dit, tmp_path / "u", plain).bank, progress=False)
    for path, extra, message in [
        (plain, (), r"holds no stored teacher predictions.*`difftune bank`"),
        (bank, ("objective.distillation.stored_draws=2",), r"made with draws=4, this run asks for draws=2"),
        (
            bank,
            ("objective.power_down.exponent=2",),
            r"made with exponent=1.0, this run asks for exponent=2.0",
        ),
        (bank, ("bank.condition=own",), r"made with condition='null', this run asks for condition='own'"),
    ]:
        with pytest.raises(UserError, match=message) as err:
            Trainer(make_cfg(dit, tmp_path / "run", path, *STORED, *extra))
        assert "\n" not in str(err.value)
    # a dry run checks the bank too, as far as it can without the model's process
    sets = overrides(dit, tmp_path / "run", plain, *STORED)
    assert main(["train", "--dry-run", *(arg for item in sets for arg in ("--set", item))]) == 2
    assert "holds no stored teacher predictions" in capsys.readouterr().err
    sets = overrides(dit, tmp_path / "run", bank, *STORED)
    assert main(["train", "--dry-run", *(arg for item in sets for arg in ("--set", item))]) == 0
    assert "teacher    stored in the bank: 4 draws per sample" in capsys.readouterr().out
    for settings, message in [
        ({"distillation": DistillationSettings(teacher="stored")}, "needs objective.kind=distillation"),
        (
            {
                "kind": "distillation",
                "retention_data": "target",
                "distillation": DistillationSettings(teacher="stored"),
            },
            "retention_data=bank",
        ),
        (
            {
                "kind": "distillation",
                "bank_schedule": "data_driven",
                "distillation": DistillationSettings(teacher="stored"),
            },
            "data_driven",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            ObjectiveConfig(**settings)
    with pytest.raises(ConfigError, match="stored_draws=0 must be >= 1"):
        DistillationSettings(stored_draws=0)
    with pytest.raises(ConfigError, match="not supported with data.buckets"):
        folder = (
            "data.source=folder",
            f"data.path={tmp_path}",
            "data.classes=null",
            "data.per_class=null",
            "data.resolution=64",
        )
        make_cfg(dit, tmp_path / "run", bank, *STORED, *folder, "data.buckets.enabled=true")


def test_the_memory_estimate_counts_a_teacher_copy_only_under_copy(
    dit: Path, bank: Path, tmp_path: Path
) -> None:
    from difftune.backbones.loading import peek_backbone
    from difftune.training.memory_estimate import FLOAT32, estimate_training_memory

    params = sum(p.numel() for p in load_pretrained(str(dit)).backbone.parameters())

    def estimate(*extra: str):
        cfg = make_cfg(dit, tmp_path / "run", bank, "objective.kind=distillation", *extra)
        return estimate_training_memory(cfg, peek_backbone(str(dit)), dit)

    copy, stored = estimate(), estimate("objective.distillation.teacher=stored")
    assert copy.teacher == params * FLOAT32 and "teacher copy" in copy.line()
    assert stored.teacher == 0 and "teacher copy" not in stored.line()
    assert copy.total - stored.total == params * FLOAT32
    assert estimate("objective.distillation.teacher_dtype=bfloat16").teacher == params * 2
    assert estimate("tuning.method=lora").teacher == 0  # its adapters are switched off instead


def test_a_task_sequence_refuses_stored_predictions(tmp_path: Path) -> None:
    import yaml

    from difftune.continual.plan import load_sequence
    from test_continual import sequence_config

    save_pipeline_dir(tmp_path / "source", tiny_dit(num_classes=2), "transformer")
    path = sequence_config(tmp_path, tmp_path / "seq", "pretrained")
    raw = yaml.safe_load(path.read_text())
    raw["bank"]["path"] = str(tmp_path / "bank")
    raw["objective"] = {**raw["objective"], "kind": "distillation", "distillation": {"teacher": "stored"}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="teacher=stored is not supported in a task sequence"):
        load_sequence(path)
    raw["objective"]["distillation"]["teacher"] = "copy"
    path.write_text(yaml.safe_dump(raw))
    assert load_sequence(path).base.objective.distillation.teacher == "copy"
