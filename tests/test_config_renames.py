"""Config by kind: a sub-section per schedule, objective and tuning method, one sampling shape, Literal
choices; old spellings (a file, an old run's config.yaml, an adapter's record, --set, a demo method)
still load, with one deprecation line per old key and load."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import get_args

import pytest
import torch
import yaml

from difftune.cli import main
from difftune.config.checks import choices, field_types
from difftune.config.data import DATA_SOURCES, DataConfig, DataSource
from difftune.config.experiment import (
    ConfigError,
    ExperimentConfig,
    ObjectiveConfig,
    config_from_dict,
    load_config,
)
from difftune.config.files import read_config_file
from difftune.config.names import OBJECTIVE_NAMES, ObjectiveKind
from difftune.config.renames import PER_SCHEDULE, RENAMES, old_keys, upgrade
from difftune.config.sections import check_key, leaf_keys
from difftune.config.tuning import LoraSettings, TuningConfig, settings_from_record
from difftune.demos.digits import MethodSpec
from difftune.errors import UserError
from difftune.objectives import build_objective
from difftune.process import build_process
from difftune.process.schedulers import make_scheduler
from difftune.training.outputs import flat_config
from difftune.training.run_dir import check_resume_config

ROOT = Path(__file__).resolve().parents[1]
OLD = ROOT / "tests" / "fixtures" / "old_configs"  # copies of configs as they were before the renames
BASE = ["model.pretrained=x/y", "data.source=digits", "objective.bank_share=0"]
SECTIONS = {"model", "data", "bank", "objective", "train", "tuning"}


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "difftune.config.renames"]
    caplog.clear()
    return lines


def _section_classes() -> dict[str, type]:
    cfg = load_config(None, BASE)
    return {name: type(getattr(cfg, name)) for name in SECTIONS}


# ------------------------------------------------------------------------------- old files still load


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "dit_xl2_food101",
            [
                "bank.scheduler is deprecated: use bank.sampling.scheduler",
                "bank.num_inference_steps is deprecated: use bank.sampling.steps",
                "bank.guidance_scale is deprecated: use bank.sampling.guidance_scale",
                "objective.target_exponent is deprecated: use objective.power_up.exponent (the exponent of "
                "objective.target_schedule=power_up)",
                "objective.bank_exponent is deprecated: use objective.power_down.exponent (the exponent of "
                "objective.bank_schedule=power_down)",
            ],
        ),
        (
            "sd15_controlnet_canny",
            [
                "bank.scheduler is deprecated: use bank.sampling.scheduler",
                "bank.num_inference_steps is deprecated: use bank.sampling.steps",
                "bank.guidance_scale is deprecated: use bank.sampling.guidance_scale",
                "train.sample_guidance_scale is deprecated: use train.sampling.guidance_scale",
                "objective.target_exponent is deprecated: use objective.power_up.exponent (the exponent of "
                "objective.target_schedule=power_up)",
                "objective.bank_exponent is deprecated: use objective.power_down.exponent (the exponent of "
                "objective.bank_schedule=power_down)",
                "bank.prompts=null is deprecated: use bank.prompts=captions",
            ],
        ),
    ],
)
def test_an_old_config_file_equals_its_new_spelling(
    name: str, expected: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        old = load_config(OLD / f"{name}.yaml")
        lines = _said(caplog)
        new = load_config(ROOT / "configs" / "paper" / f"{name}.yaml")
        assert _said(caplog) == []  # the shipped config is in the new spelling
    assert old == new and old.to_dict() == new.to_dict() and old.unset == new.unset
    assert lines == expected  # one line per old key, each naming its new spelling
    assert len(lines) == len(old_keys(read_config_file(OLD / f"{name}.yaml")))


def test_an_old_runs_saved_config_loads_and_saves_in_the_new_spelling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = OLD / "saved_lora_distillation.yaml"  # config.yaml of a run, written before the renames
    with caplog.at_level("WARNING"):
        cfg = load_config(path)
        lines = _said(caplog)
    keys = old_keys(read_config_file(path))
    # once each, in order (an old value's line names its key and the value: bank.prompts=null)
    assert len(keys) == 27 and [re.split("[ =]", line, maxsplit=1)[0] for line in lines] == keys
    assert "objective.teacher_dtype is deprecated: use objective.distillation.teacher_dtype" in lines
    assert "model.tuning is deprecated: use tuning.method" in lines
    assert (cfg.tuning.method, cfg.tuning.lora) == ("lora", LoraSettings(rank=4, alpha=4))
    assert cfg.objective.distillation.teacher_dtype == "bfloat16" and cfg.objective.min_snr.gamma == 3
    assert (cfg.objective.data_driven.bins, cfg.objective.data_driven.draws) == (10, 8)
    assert (cfg.bank.sampling.scheduler, cfg.bank.sampling.steps) == ("DDIMScheduler", 10)
    assert (cfg.train.sampling.steps, cfg.train.sampling.guidance_scale) == (5, 2.0)
    # its streams' schedules (min_snr, data_driven) read no exponent or offset: those are left out
    assert any("objective.target_exponent is deprecated" in line and "left out" in line for line in lines)
    cfg.save(tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert old_keys(saved) == [] and saved["tuning"]["lora"]["rank"] == 4
    with caplog.at_level("WARNING"):
        assert load_config(tmp_path / "config.yaml") == cfg
        assert _said(caplog) == []


def test_resuming_an_old_run_compares_the_upgraded_configs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = tmp_path / "checkpoint-0000002"
    checkpoint.mkdir()
    shutil.copy(OLD / "saved_lora_distillation.yaml", checkpoint / "config.yaml")
    cfg = load_config(OLD / "saved_lora_distillation.yaml")
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_resume_config(cfg, checkpoint)  # the same run: accepted, silently
    assert caplog.records == []
    with caplog.at_level("WARNING"):
        grids = load_config(OLD / "saved_lora_distillation.yaml", ["train.sampling.steps=9"])
        check_resume_config(grids, checkpoint)  # how grids are drawn may change
    assert "train.sampling.steps: 5 -> 9" in caplog.text
    other = load_config(OLD / "saved_lora_distillation.yaml", ["objective.min_snr.gamma=4"])
    with pytest.raises(UserError, match=r"objective\.min_snr\.gamma: 3 -> 4"):
        check_resume_config(other, checkpoint)


def test_the_old_reproduction_configs_equal_the_new(caplog: pytest.LogCaptureFixture) -> None:
    for name in ("digits_grid", "digits_peft"):
        old = yaml.safe_load((OLD / f"{name}.yaml").read_text())["methods"]
        new = yaml.safe_load((ROOT / "configs" / "reproduction" / f"{name}.yaml").read_text())["methods"]
        assert old.keys() == new.keys()
        for method in old:
            assert MethodSpec.parse(old[method]) == MethodSpec.parse(new[method]), (name, method)
    caplog.clear()
    with caplog.at_level("WARNING"):
        MethodSpec.parse({"target_exponent": 0.5, "bank_exponent": 0.5})
        assert len(_said(caplog)) == 2
        spec = MethodSpec.parse({"tuning": "lora", "tuning_settings": {"lora_rank": 4}})
        assert _said(caplog) == ["tuning.lora_rank is deprecated: use tuning.lora.rank"]
    assert spec.tuning == TuningConfig(method="lora", lora=LoraSettings(rank=4))


def test_an_old_adapter_record_loads_its_settings(caplog: pytest.LogCaptureFixture) -> None:
    # difftune_tuning.json of an adapter saved before the renames: the flat tuning section
    flat = yaml.safe_load((OLD / "saved_lora_distillation.yaml").read_text())["tuning"]
    with caplog.at_level("WARNING"):
        settings = settings_from_record("lora", flat)
    assert settings == TuningConfig(method="lora", lora=LoraSettings(rank=4, alpha=4.0))
    assert _said(caplog) == []  # the record is difftune's file, not the user's
    assert settings_from_record("lora", {"method": "lora", "lora": {"rank": 4, "alpha": 4.0}}) == settings


def test_an_old_config_dry_runs_with_its_deprecation_lines(
    dit_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = {
        "model": {"pretrained": str(dit_dir), "tuning": "lora"},
        "data": {"source": "digits", "classes": [5, 6, 7], "per_class": 4},
        "objective": {"bank_share": 0.0, "target_exponent": 2.0},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 8, "max_steps": 2, "sample_steps": 3},
        "tuning": {"lora_rank": 4},
    }
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw))
    with caplog.at_level("WARNING"):
        assert main(["train", "--config", str(tmp_path / "old.yaml"), "--dry-run"]) == 0
    assert [line.split(" ")[0] for line in _said(caplog)] == [
        "model.tuning",
        "tuning.lora_rank",
        "train.sample_steps",
        "objective.target_exponent",
    ]
    out = capsys.readouterr().out
    assert "target power_up(s=2), bank power_down(s=1)" in out and "lora tuning" in out
    assert "target_exponent" not in out and "exponent: 2.0" in out  # the printed config is the new one


# --------------------------------------------------------------------------------------------- --set


def test_set_takes_the_old_and_the_new_spelling(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        old = load_config(None, [*BASE, "objective.snr_gamma=3"])
        assert _said(caplog) == ["objective.snr_gamma is deprecated: use objective.min_snr.gamma"]
        new = load_config(None, [*BASE, "objective.min_snr.gamma=3"])
        assert _said(caplog) == []
    assert old == new and new.objective.min_snr.gamma == 3
    assert (
        "objective.min_snr.gamma" not in new.unset
        and "objective.min_snr.gamma" in load_config(None, BASE).unset
    )
    cfg = load_config(
        None, [*BASE, "objective.distillation.teacher_dtype=bfloat16", "bank.sampling={steps: 3}"]
    )
    assert cfg.objective.distillation.teacher_dtype == "bfloat16" and cfg.bank.sampling.steps == 3
    # a later override wins, whatever its spelling
    assert (
        load_config(
            None, [*BASE, "objective.min_snr.gamma=4", "objective.snr_gamma=2"]
        ).objective.min_snr.gamma
        == 2
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "objective.min_snr.gama=3",
            "unknown key 'objective.min_snr.gama'; valid keys of 'objective.min_snr': ['gamma']",
        ),
        (
            "objective.bank_share.x=1",
            "unknown key 'objective.bank_share.x': objective.bank_share is a setting",
        ),
        ("objective.power_up.exponent=-1", "objective.power_up.exponent=-1 must be >= 0"),
        (
            "objective.power.axis=sigma",
            "objective.power.axis='sigma': use one of ['auto', 'index', 'log_snr', 'offsets']",
        ),
        ("tuning.lora.rank=2.5", "tuning.lora.rank=2.5 must be int"),
        ("bank.sampling.steps=0", "bank.sampling.steps=0 must be a positive integer"),
        ("objective.min_snr=5", "config section 'objective.min_snr' must be a mapping of key: value"),
    ],
)
def test_a_bad_nested_key_or_value_is_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_each_old_key_is_said_once_per_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"model": {"pretrained": "x/y"}, "data": {"source": "digits"}, "bank": {"seed": 2}})
    )
    with caplog.at_level("WARNING"):
        cfg = load_config(path, ["bank.seed=3", "objective.bank_share=0", "bank.seed=4"])
        assert _said(caplog) == ["bank.seed is deprecated: use bank.sampling.seed"]
        load_config(path, ["objective.bank_share=0"])
        assert len(_said(caplog)) == 1  # and again at the next load
    assert cfg.bank.sampling.seed == 4


def test_a_setting_in_both_spellings_is_refused(tmp_path: Path) -> None:
    raw = {"model": {"pretrained": "x/y"}, "data": {"source": "digits"}}
    path = tmp_path / "both.yaml"
    path.write_text(
        yaml.safe_dump({**raw, "objective": {"bank_share": 0, "snr_gamma": 3, "min_snr": {"gamma": 4}}})
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        "objective.snr_gamma and objective.min_snr.gamma are the same setting, in its old and its new "
        "spelling; keep objective.min_snr.gamma only"
    )
    path.write_text(
        yaml.safe_dump(
            {**raw, "model": {"pretrained": "x/y", "tuning": "lora"}, "tuning": {"method": "full"}}
        )
    )
    with pytest.raises(ConfigError, match="model.tuning and tuning.method are the same setting"):
        load_config(path)


# ---------------------------------------------------------------------- stream settings, by schedule


def test_a_stream_setting_moves_under_the_schedule_its_stream_uses(caplog: pytest.LogCaptureFixture) -> None:
    def objective(values: dict) -> ObjectiveConfig:
        raw = {
            "model": {"pretrained": "x/y"},
            "data": {"source": "digits"},
            "objective": {"bank_share": 0, **values},
        }
        return config_from_dict(raw).objective

    both_down = objective({"target_schedule": "power_down", "target_exponent": 2, "bank_exponent": 2})
    assert both_down.power_down.exponent == 2 and both_down.power_up.exponent == 1.0
    with pytest.raises(ConfigError, match="both become objective.power_down.exponent"):
        objective({"target_schedule": "power_down", "target_exponent": 2, "bank_exponent": 3})
    with caplog.at_level("WARNING"):
        unread = objective({"target_schedule": "min_snr", "target_exponent": 2})
    assert unread == ObjectiveConfig(target_schedule="min_snr", bank_share=0)  # min_snr never read it
    assert "objective.target_schedule=min_snr reads neither, so it is left out" in caplog.text
    offsets = objective(
        {
            "target_schedule": "logit_normal_up",
            "bank_schedule": "logit_normal_down",
            "target_offset": 0.7,
            "bank_offset": 1.6,
        }
    )
    assert (offsets.logit_normal_up.offset, offsets.logit_normal_down.offset) == (0.7, 1.6)
    assert objective({"target_exponent": 2}).power_up.exponent == 2  # the default target schedule


def test_an_old_file_whose_stream_changes_by_set_keeps_its_exponent(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"pretrained": "x/y"},
                "data": {"source": "digits"},
                "objective": {"bank_share": 0, "target_exponent": 2},
            }
        )
    )
    cfg = load_config(path, ["objective.target_schedule=power_down"])
    assert (
        cfg.objective.power_down.exponent == 2 and cfg.objective.exponent(cfg.objective.target_schedule) == 2
    )


class _Backbone:
    learns_variance = False


def test_an_old_objective_builds_the_same_schedules() -> None:
    old = {
        "target_schedule": "power_up",
        "target_exponent": 1.5,
        "bank_exponent": 0.5,
        "schedule_axis": "log_snr",
    }
    new = {"power_up": {"exponent": 1.5}, "power_down": {"exponent": 0.5}, "power": {"axis": "log_snr"}}
    base = {"model": {"pretrained": "x/y"}, "data": {"source": "digits"}}
    a = config_from_dict({**base, "objective": {"bank_share": 0, **old}}).objective
    b = config_from_dict({**base, "objective": {"bank_share": 0, **new}}).objective
    process = build_process(make_scheduler().config)
    built = [build_objective(o, process, _Backbone()).schedules for o in (a, b)]
    for left, right in zip(*built, strict=True):
        assert torch.equal(left.probs(), right.probs())


# ------------------------------------------------------------------------------------ shapes and types


def test_unset_names_the_nested_keys_left_to_their_defaults() -> None:
    cfg = load_config(None, [*BASE, "bank.sampling.steps=3", "tuning.method=lora", "tuning.lora.rank=4"])
    every = set().union(*(leaf_keys(cls, name) for name, cls in _section_classes().items()))
    given = {
        "model.pretrained",
        "data.source",
        "objective.bank_share",
        "bank.sampling.steps",
        "tuning.method",
        "tuning.lora.rank",
    }
    assert cfg.unset == every - given
    assert {"bank.sampling.seed", "objective.min_snr.gamma", "tuning.lora.alpha"} <= cfg.unset
    old = load_config(None, [*BASE, "bank.num_inference_steps=3", "model.tuning=lora", "tuning.lora_rank=4"])
    assert old.unset == cfg.unset and old == cfg


def test_flat_config_flattens_the_nested_keys() -> None:
    flat = flat_config(load_config(None, BASE))
    assert flat["objective.distillation.teacher_dtype"] == "float32" and flat["bank.sampling.steps"] == 25
    assert flat["tuning.lora.targets"] == "None" and flat["objective.power.axis"] == "auto"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


def test_every_choice_is_a_literal_and_its_check_lists_the_values() -> None:
    assert choices(field_types(ObjectiveConfig)["realisation"]) == ("sample", "weight")
    assert get_args(ObjectiveKind) == OBJECTIVE_NAMES and get_args(DataSource) == tuple(DATA_SOURCES)
    with pytest.raises(ConfigError) as info:
        ObjectiveConfig(realisation="foo")
    assert str(info.value) == "objective.realisation='foo': use one of ['sample', 'weight']"
    with pytest.raises(ConfigError, match=r"data.on_bad_file='ignore': use one of \['error', 'skip'\]"):
        DataConfig(source="digits", on_bad_file="ignore")
    literal = {  # every Literal field of every section: a wrong value is refused with the values
        f"{name}.{field}": tp
        for name, cls in _section_classes().items()
        for field, tp in field_types(cls).items()
        if choices(tp)
    }
    assert {
        "objective.kind",
        "objective.realisation",
        "objective.retention_data",
        "train.mixed_precision",
        "train.on_non_finite",
        "train.validation_prompts",
        "train.keep_best",
        "bank.condition",
        "data.source",
        "data.on_bad_file",
    } <= set(literal)
    for key, tp in literal.items():
        with pytest.raises(ConfigError) as info:
            load_config(None, [*BASE, f"{key}=nonsense"])
        optional = type(None) in get_args(tp)  # train.keep_best: a choice, or null for none
        assert str(info.value) == f"{key}='nonsense': use one of {list(choices(tp))}" + (
            " or null" if optional else ""
        )


def test_the_rename_table_names_keys_that_exist_only_in_their_new_spelling() -> None:
    sections = _section_classes()
    for old, new in RENAMES.items():
        check_key(sections, new)
        with pytest.raises(ConfigError, match="unknown key"):
            check_key(sections, old)
    for old, (_, setting, schedules) in PER_SCHEDULE.items():
        for schedule in schedules:
            check_key(sections, f"objective.{schedule}.{setting}")
        with pytest.raises(ConfigError, match="unknown key"):
            check_key(sections, old)
    readme = (ROOT / "README.md").read_text()
    for old in (*RENAMES, *PER_SCHEDULE):
        assert old.split(".")[-1] in readme, old


def test_the_readme_example_is_a_valid_config(caplog: pytest.LogCaptureFixture) -> None:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(.*?)\n```", text[text.index("sits in a sub-section named after") :], re.S)
    raw = yaml.safe_load(block.group(1))
    with caplog.at_level("WARNING"):
        cfg = config_from_dict({**raw, "model": {"pretrained": "x/y"}, "data": {"source": "digits"}})
    assert _said(caplog) == [] and isinstance(cfg, ExperimentConfig)
    assert cfg.tuning.method == "lora" and cfg.objective.power_up.exponent == 1.0
    assert upgrade(raw, warn=False) == raw  # nothing in it is an old spelling
