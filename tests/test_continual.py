"""Task sequences (``difftune continual``): label rows and table growth, bank policies, resume, measures."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from difftune.backbones.label_table import grow_label_table, label_rows
from difftune.cli import main
from difftune.config.checks import ConfigError
from difftune.config.experiment import ExperimentConfig, load_config
from difftune.continual.banks import reservoir
from difftune.continual.measures import ScoreMatrix
from difftune.continual.plan import load_sequence
from difftune.data.builtin import load_sklearn_digits
from difftune.errors import UserError
from difftune.io.store import LatentStore
from difftune.metrics.digits import save_classifier, train_digit_classifier
from difftune.testing.models import save_pipeline_dir, tiny_dit, tiny_unet


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-class tiny DiT source and a digit classifier for the measures."""
    root = tmp_path_factory.mktemp("continual")
    save_pipeline_dir(root / "source", tiny_dit(num_classes=2), "transformer")
    images, labels = load_sklearn_digits()
    save_classifier(train_digit_classifier(images, labels, steps=20, seed=0), root / "digits.safetensors")
    return root


def sequence_config(workspace: Path, out: Path, policy: str, **continual: object) -> Path:
    """A two-stage digits sequence (2-3, then 4-5) at toy size, written next to ``out``."""
    raw = {
        "model": {"pretrained": str(workspace / "source")},
        "data": {"source": "digits", "per_class": 5},
        "bank": {"num_samples": 8, "batch_size": 8, "shard_size": 4, "sampling": {"steps": 2}},
        "objective": {"bank_share": 0.5},
        "train": {
            "output_dir": str(out),
            "max_steps": 2,
            "batch_size": 4,
            "checkpoint_every": 2,
            "log_every": 1,
            "ema_decay": 0.9,
        },
        "tasks": [
            {"name": "2-3", "data": {"classes": [2, 3]}},
            {"name": "4-5", "data": {"classes": [4, 5]}, "steps": 4},
        ],
        "continual": {
            "bank_policy": policy,
            "features": f"digits:{workspace / 'digits.safetensors'}",
            "samples_per_class": 4,
            "sampling": {"steps": 2, "guidance_scale": 1.0},
            "source_data": {"source": "digits", "classes": [0, 1]},
            **continual,
        },
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "ema" / "transformer" / "diffusion_pytorch_model.safetensors"))


# ---------------------------------------------------------------- label rows


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_grown_table_keeps_learned_rows_and_the_null_row(make) -> None:
    model = make(num_classes=3).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 300, 600, 900])
    old = torch.tensor([0, 2, 3, 1])  # 3 = the null row before growth
    with torch.no_grad():
        before = model(x, t, class_labels=old).sample
    assert grow_label_table(model, 5) == 3
    assert label_rows(model) == 5
    with torch.no_grad():
        after = model(x, t, class_labels=torch.tensor([0, 2, 5, 1])).sample  # the null row is now 5
        new = model(x, t, class_labels=torch.tensor([3, 4, 3, 4])).sample
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    table = (
        model.class_embedding
        if isinstance(model, type(tiny_unet()))
        else model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    )
    torch.testing.assert_close(table.weight[3], table.weight[:3].mean(0))  # a new row: the learned rows' mean
    assert torch.isfinite(new).all()


def test_growth_refuses_to_drop_rows_and_models_without_labels() -> None:
    with pytest.raises(UserError, match="never dropped"):
        grow_label_table(tiny_dit(num_classes=4), 2)
    from difftune.testing.models import tiny_cond_unet

    with pytest.raises(UserError, match="no class-label table"):
        grow_label_table(tiny_cond_unet(), 4)


def test_label_offset_moves_the_target_labels(dit_dir: Path, tmp_path: Path) -> None:
    from difftune.backbones.loading import load_pretrained
    from difftune.data.targets import prepare_target

    cfg = load_config(
        None,
        [
            f"model.pretrained={dit_dir}",
            "data.source=digits",
            "data.classes=[7, 9]",
            "data.per_class=3",
            "data.label_offset=2",
            "objective.bank_share=0",
        ],
    )
    target = prepare_target(cfg.data, load_pretrained(str(dit_dir)), tmp_path / "cache")
    assert sorted(target.cond["labels"].unique().tolist()) == [2, 3]
    assert target.class_names == ["label0", "label1", "7", "9"]
    with pytest.raises(ConfigError, match="label_offset"):
        load_config(None, ["model.pretrained=x/y", "data.source=digits", "data.label_offset=-1"])
    named = dataclasses.replace(cfg.data, label_names=["zero", "one"])
    assert prepare_target(named, load_pretrained(str(dit_dir)), tmp_path / "named").class_names == [
        "zero",
        "one",
        "7",
        "9",
    ]
    with pytest.raises(ConfigError, match="names 1 rows"):
        dataclasses.replace(cfg.data, label_names=["zero"])


# ---------------------------------------------------------------- config


def test_sequence_config_refusals(workspace: Path, tmp_path: Path) -> None:
    path = sequence_config(workspace, tmp_path / "seq", "previous")
    plan = load_sequence(path, ["continual.samples_per_class=2"])
    assert [t.name for t in plan.tasks] == ["2-3", "4-5"] and plan.spec.samples_per_class == 2
    data = plan.stage_config(2, plan_start(plan), ["0", "1", "2", "3"], "b", False).data
    assert (data.label_offset, data.label_names, data.classes) == (4, ["0", "1", "2", "3"], [4, 5])
    with pytest.raises(ConfigError, match="difftune continual"):
        load_config(path)
    raw = yaml.safe_load(path.read_text())
    for change, message in [
        ({"tasks": []}, "non-empty list"),
        ({"tasks": [{"data": {"clases": [1]}}]}, "clases"),
        ({"tasks": [{"name": "a"}, {"name": "a"}]}, "unique"),
        ({"tasks": [{"name": "a b"}]}, "folder"),
        ({"tasks": [{"steps": 0}]}, "positive"),
        ({"tuning": {"method": "lora"}}, "tuning.method=full"),
        ({"continual": {"bank_policy": "accumulate", "bank_cap": 0}}, "bank_cap"),
        ({"continual": {"bank_policy": "previous", "bank_cap": 5}}, "accumulate"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**raw, **change}))
        with pytest.raises(ConfigError, match=message):
            load_sequence(bad)


def plan_start(plan):
    from difftune.continual.plan import StartModel

    return StartModel(plan.base.model.pretrained, None)


def test_dry_run_lists_the_stages(workspace: Path, tmp_path: Path, capsys) -> None:
    path = sequence_config(workspace, tmp_path / "seq", "accumulate", bank_cap=12)
    assert main(["continual", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage 2    4-5" in out and "merged banks of models 0..1" in out and "4 steps" in out
    assert not (tmp_path / "seq").exists()


# ---------------------------------------------------------------- banks


def test_reservoir_is_uniform_and_extends_its_prefix() -> None:
    stream = [(0, i) for i in range(8)] + [(1, i) for i in range(8)]
    assert reservoir(stream[:5], 6, seed=0) == stream[:5]  # fits: all kept, in order
    first = reservoir(stream[:8], 6, seed=0)  # stage 1's bank
    longer = reservoir(stream, 6, seed=0)  # stage 2's: the same draws, then the new samples' own
    assert len(longer) == 6 and len(set(longer)) == 6
    assert all(
        a == b for a, b in zip(first, longer, strict=True) if b[0] == 0
    )  # a kept old sample stays in its slot
    counts = torch.zeros(16)
    for seed in range(2000):
        for j, i in reservoir(stream, 4, seed):
            counts[j * 8 + i] += 1
    torch.testing.assert_close(counts / 2000, torch.full((16,), 4 / 16), atol=0.04, rtol=0)


def test_a_bank_of_another_model_needs_made_by_earlier_model(
    workspace: Path, dit_dir: Path, tmp_path: Path
) -> None:
    from difftune.backbones.loading import load_pretrained
    from difftune.bank.generate import generate_bank, load_bank
    from difftune.config.bank import BankConfig
    from difftune.config.sampling import SamplingSpec

    bank = tmp_path / "bank"
    generate_bank(
        load_pretrained(str(workspace / "source")),
        BankConfig(str(bank), 4, SamplingSpec(steps=2)),
        progress=False,
    )
    other = load_pretrained(str(dit_dir))
    with pytest.raises(UserError, match="another model"):
        load_bank(bank, other)
    assert load_bank(bank, other, same_weights=False)["samples"].shape == (4, 1, 8, 8)


# ---------------------------------------------------------------- whole sequences


@pytest.fixture(scope="module")
def accumulated(workspace: Path) -> Path:
    out = workspace / "acc"
    assert (
        main(["continual", "--config", str(sequence_config(workspace, out, "accumulate", bank_cap=12))]) == 0
    )
    return out


def test_accumulate_sequence_grows_labels_merges_banks_and_measures(accumulated: Path) -> None:
    out = accumulated
    summary = json.loads((out / "stage2-4-5" / "run_summary.json").read_text())
    # the source (no class_names.json) names its rows label<i>; the tasks' names are passed on
    assert summary["classes"] == {"label0": 0, "label1": 1, "2": 2, "3": 3, "4": 4, "5": 5}
    assert json.loads((out / "stage2-4-5" / "final" / "class_names.json").read_text())[2:] == [
        "2",
        "3",
        "4",
        "5",
    ]
    config = json.loads((out / "stage2-4-5" / "final" / "ema" / "transformer" / "config.json").read_text())
    assert config["num_embeds_ada_norm"] == 6  # 2 source rows + 2 + 2
    merged = LatentStore(out / "banks" / "merged2").load()
    model1 = LatentStore(out / "banks" / "model1").load()
    assert merged["samples"].shape[0] == 12 and set(merged["stages"].tolist()) <= {0, 1}
    assert set(model1["labels"].tolist()) == {0, 1, 2, 3}  # model 1 knows the source's and task 1's rows
    first = LatentStore(out / "banks" / "merged1").load()
    assert first["samples"].shape[0] == 8 and first["stages"].tolist() == [0] * 8
    for k, i in enumerate(merged["stages"].tolist()):  # every merged sample is its model's bank sample
        source = LatentStore(out / "banks" / f"model{i}").load()
        match = (source["seeds"] == merged["seeds"][k]).nonzero().flatten()
        torch.testing.assert_close(source["samples"][match[0]], merged["samples"][k])
    m = ScoreMatrix.read(out / "measures.json")
    assert m.stages == ["source", "2-3", "4-5"] and m.stage_dirs == [None, "stage1-2-3", "stage2-4-5"]
    assert m.scores[0][1:] == [None, None] and m.scores[1][2] is None
    assert all(v is not None and v >= 0 for v in (m.scores[2] + m.before[1:] + m.baseline[1:]))
    assert m.before[1] == pytest.approx(m.baseline[1])  # stage 1 starts from the source, grown alike
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerunning_a_finished_sequence_changes_nothing(workspace: Path, accumulated: Path) -> None:
    before = weights(accumulated / "stage2-4-5")
    measures = (accumulated / "measures.json").read_text()
    assert main(["continual", "--config", str(workspace / "acc.yaml")]) == 0
    torch.testing.assert_close(weights(accumulated / "stage2-4-5"), before, rtol=0, atol=0)
    assert (accumulated / "measures.json").read_text() == measures


def test_a_stage_interrupted_mid_way_resumes_exactly(workspace: Path, accumulated: Path) -> None:
    out = workspace / "acc_cut"
    config = sequence_config(workspace, out, "accumulate", bank_cap=12)
    assert main(["continual", "--config", str(config)]) == 0
    stage = out / "stage2-4-5"
    shutil.rmtree(stage / "final")
    shutil.rmtree(stage / "checkpoints" / "checkpoint-0000004")  # cut after step 2 of 4
    m = ScoreMatrix.read(out / "measures.json")
    m.stages, m.stage_dirs, m.scores = m.stages[:2], m.stage_dirs[:2], m.scores[:2]
    m.write(out / "measures.json")
    assert main(["continual", "--config", str(config)]) == 0
    assert json.loads((stage / "run_summary.json").read_text())["resume_from"]["step"] == 2
    for name, value in weights(accumulated / "stage2-4-5").items():
        torch.testing.assert_close(weights(stage)[name], value, rtol=0, atol=0)
    assert (
        ScoreMatrix.read(out / "measures.json").scores[2]
        == ScoreMatrix.read(accumulated / "measures.json").scores[2]
    )


def test_a_folder_of_another_sequence_is_refused(workspace: Path, accumulated: Path, tmp_path: Path) -> None:
    out = tmp_path / "other"
    shutil.copytree(accumulated, out)
    config = sequence_config(workspace, out, "previous")
    assert main(["continual", "--config", str(config)]) == 2  # another bank policy: other weights
    assert (out / "stage2-4-5" / "final").is_dir()  # nothing was touched


def test_previous_policy_replays_the_previous_model_s_bank(workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "prev"
    config = sequence_config(workspace, out, "previous", features=None)
    assert main(["continual", "--config", str(config), "--set", "train.max_steps=1"]) == 0
    replayed = [
        yaml.safe_load((out / f"stage{k}-{n}" / "config.yaml").read_text())["bank"]
        for k, n in ((1, "2-3"), (2, "4-5"))
    ]
    assert [Path(b["path"]).name for b in replayed] == ["model0", "model1"]
    assert all(b["made_by"] == "earlier_model" for b in replayed)
    assert not (out / "measures.json").exists()
    stage2 = ExperimentConfig  # the stage's own config reloads as a plain training config
    assert isinstance(load_config(out / "stage2-4-5" / "config.yaml"), stage2)


def test_shared_labels_reuse_rows_and_the_table_does_not_grow(workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    config = sequence_config(workspace, out, "pretrained", labels="shared")
    assert main(["continual", "--config", str(config), "--set", "train.max_steps=1"]) == 0
    stage2 = yaml.safe_load((out / "stage2-4-5" / "config.yaml").read_text())
    assert stage2["data"]["label_offset"] == 0 and not (out / "starts" / "stage2").exists()
    config = json.loads((out / "stage2-4-5" / "final" / "ema" / "transformer" / "config.json").read_text())
    assert config["num_embeds_ada_norm"] == 2  # tasks of 2 classes fit the source's 2 rows


def test_the_time_split_recipe_dry_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    recipe = (
        Path(__file__).resolve().parents[1] / "configs" / "paper" / "continual_evolving_image_search.yaml"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["continual", "--config", str(recipe), "--dry-run"]) == 2
    assert (
        "task 2009: data.path 'data/evolving_image_search/2009' is not a directory" in capsys.readouterr().err
    )
    for task in load_sequence(recipe).tasks:
        Path(task.data["path"]).mkdir(parents=True)
    assert main(["continual", "--config", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 stages" in out and "label rows shared by the tasks" in out and "stage 6    2014" in out
    plan = load_sequence(recipe)
    assert plan.base.model.pretrained == "facebook/DiT-XL-2-256" and plan.base.bank_count == 6
    assert plan.task_data(3).path == "data/evolving_image_search/2011" and plan.spec.labels == "shared"


def test_a_bank_path_of_another_model_is_refused(
    workspace: Path, dit_dir: Path, tmp_path: Path, capsys
) -> None:
    from difftune.backbones.loading import load_pretrained
    from difftune.bank.generate import generate_bank
    from difftune.config.bank import BankConfig
    from difftune.config.sampling import SamplingSpec

    bank = tmp_path / "other-bank"
    generate_bank(
        load_pretrained(str(dit_dir)), BankConfig(str(bank), 4, SamplingSpec(steps=2)), progress=False
    )
    config = sequence_config(workspace, tmp_path / "seq", "pretrained", features=None)
    assert main(["continual", "--config", str(config), "--set", f"bank.path={bank}"]) == 2
    assert "was made by another model" in capsys.readouterr().err
    assert not (tmp_path / "seq" / "stage1-2-3").exists()


def test_a_sequence_written_by_an_older_difftune_is_compared_setting_by_setting(
    workspace: Path, accumulated: Path
) -> None:
    plan = load_sequence(workspace / "acc.yaml")
    record = json.loads((accumulated / "sequence.json").read_text())
    older = json.loads(json.dumps(record))
    del older["config"]["bank"]["made_by"]  # a setting added since: it ran with its default
    del older["continual"]["labels"]
    assert plan.changes_from(older) == []
    other = load_sequence(workspace / "acc.yaml", ["data.per_class=7", "continual.bank_cap=10"])
    changes = other.changes_from(record)
    assert "data.per_class: 5 -> 7" in changes and "continual.bank_cap: 12 -> 10" in changes


def test_a_text_to_image_sequence_replays_the_previous_model_s_bank_of_its_captions(tmp_path: Path) -> None:
    from difftune.testing.models import save_sd_pipeline
    from test_stable_diffusion import _caption_folder

    sd = save_sd_pipeline(tmp_path / "pipe")
    first, second = _caption_folder(tmp_path / "a"), _caption_folder(tmp_path / "b", n=6)
    raw = {
        "model": {"pretrained": str(sd)},
        "data": {"source": "captions"},
        "bank": {"num_samples": 6, "sampling": {"steps": 2}, "batch_size": 4},
        "objective": {"bank_share": 0.25},
        "train": {
            "output_dir": str(tmp_path / "out"),
            "batch_size": 4,
            "max_steps": 2,
            "sampling": {"steps": 2},
        },
        "tasks": [{"name": "a", "data": {"path": str(first)}}, {"name": "b", "data": {"path": str(second)}}],
        "continual": {"bank_policy": "previous"},
    }
    (tmp_path / "seq.yaml").write_text(yaml.safe_dump(raw))
    assert main(["continual", "--config", str(tmp_path / "seq.yaml")]) == 0
    out = tmp_path / "out"
    banks = [LatentStore(out / "banks" / f"model{j}").manifest for j in (0, 1)]
    from difftune.backbones.loading import load_pretrained

    stage1 = load_pretrained(str(out / "stage1-a" / "final"), "ema/unet")
    assert banks[1]["source_fingerprint"] == stage1.fingerprint() != banks[0]["source_fingerprint"]
    assert [b["num_prompts"] for b in banks] == [8, 6]  # the captions of the stage that replays each
    stage2 = yaml.safe_load((out / "stage2-b" / "config.yaml").read_text())
    assert stage2["model"]["pretrained"] == str(out / "stage1-a" / "final") and stage2["data"]["path"] == str(
        second
    )
    with pytest.raises(UserError, match="class-conditional"):
        from difftune.backbones.loading import load_pretrained
        from difftune.continual.runner import Measures

        plan = load_sequence(tmp_path / "seq.yaml", ["continual.features=inception"])
        Measures(plan, load_pretrained(str(sd)), plan_start(plan), "cpu")
