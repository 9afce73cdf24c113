"""Config settings that would be ignored, crash later or surprise: refused in one line, or said at start-up."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from difftune.cli import main
from difftune.config.experiment import ConfigError, ObjectiveConfig, load_config
from difftune.config.tuning import SETTING_USERS, methods_using
from difftune.training.loop import Trainer
from difftune.tuning import TUNING_METHODS, TuningConfig
from test_training import make_cfg

BASE = ["model.pretrained=x/y", "data.source=digits", "objective.bank_share=0", "train.max_steps=3"]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difftune: error:"), lines
    return lines[0]


# ------------------------------------------------------------------------- distillation without retention


@pytest.mark.parametrize("retention", ["bank", "target"])
def test_distillation_without_a_retention_share_is_refused(retention: str) -> None:
    with pytest.raises(ConfigError) as info:
        ObjectiveConfig(kind="distillation", retention_data=retention, bank_share=0.0)
    message = str(info.value)
    assert message.startswith("objective.kind=distillation distils on the retention share of each batch")
    assert "objective.bank_share=0 gives it none; set objective.bank_share > 0" in message
    assert ("target images, no bank needed" in message) == (retention == "target")
    assert "or use objective.kind=diff_tuning" in message and "\n" not in message
    ObjectiveConfig(kind="distillation", retention_data=retention, bank_share=0.2)  # a share is enough


# ------------------------------------------------------------------------------------- --set YAML errors


def test_a_set_value_that_is_not_yaml_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, "train.max_steps=[1,"])
    message = str(info.value)
    assert message.startswith("--set 'train.max_steps=[1,': the value is not valid YAML (")
    assert "quote it to give it as text: --set 'train.max_steps=\"[1,\"'" in message and "\n" not in message
    assert main(["train", "--dry-run", *(f"--set={item}" for item in [*BASE, "train.max_steps=[1,"])]) == 2
    assert _one_error_line(capsys) == f"difftune: error: {message}"


# ---------------------------------------------------------------------- tuning settings of another method


def test_every_tuning_setting_belongs_to_registered_methods() -> None:
    groups = [f.name for f in dataclasses.fields(TuningConfig) if f.name != "method"]
    assert set(groups) == set(SETTING_USERS)  # every sub-section is some methods' settings
    for group in groups:
        assert set(methods_using(group)) <= set(TUNING_METHODS), group
    assert all(users for users in SETTING_USERS.values())


@pytest.mark.parametrize(
    ("method", "setting", "message"),
    [
        (
            "full",
            "tuning.lora.rank=4",
            "tuning.lora.rank=4 is a setting of tuning.method=lora/loha/lokr, but tuning.method=full ignores it; "
            "set tuning.method=lora (or loha, lokr), or remove tuning.lora.rank",
        ),
        (
            "bitfit",
            "tuning.difffit.blocks=[0]",
            "tuning.difffit.blocks=[0] is a setting of tuning.method=difffit, but tuning.method=bitfit ignores it; "
            "set tuning.method=difffit, or remove tuning.difffit.blocks",
        ),
        (
            "lora",
            "tuning.vpt.tokens=8",  # the default, but given explicitly: it counts
            "tuning.vpt.tokens=8 is a setting of tuning.method=vpt, but tuning.method=lora ignores it",
        ),
    ],
)
def test_tuning_settings_of_another_method_are_refused(method: str, setting: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, f"tuning.method={method}", setting])
    assert str(info.value).startswith(message)


def test_tuning_settings_of_several_methods_are_named_together() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, "tuning.lora.rank=8", "tuning.adaptformer.dim=3"])
    assert str(info.value) == (
        "tuning.lora.rank=8, tuning.adaptformer.dim=3 are settings of tuning.method=adaptformer and "
        "lora/loha/lokr, but tuning.method=full ignores them; set tuning.method to the method they are for, "
        "or remove them"
    )


@pytest.mark.parametrize("method", ["lora", "loha", "lokr"])
def test_a_shared_setting_is_accepted_by_each_method_that_reads_it(method: str) -> None:
    cfg = load_config(None, [*BASE, f"tuning.method={method}", "tuning.lora.rank=4", "tuning.lora.alpha=2"])
    assert cfg.tuning.lora.rank == 4


def test_a_full_config_written_by_difftune_loads_again(tmp_path: Path) -> None:
    # a saved config states every tuning key (at its default for a full run): present is not "set"
    cfg = load_config(None, BASE)
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    lora = load_config(None, [*BASE, "tuning.method=lora", "tuning.lora.rank=4"])
    lora.save(tmp_path / "lora.yaml")
    with pytest.raises(ConfigError, match="tuning.lora.rank=4 is a setting of tuning.method=lora/loha/lokr"):
        load_config(tmp_path / "lora.yaml", ["tuning.method=full"])  # a value that differs counts


# -------------------------------------------------------------------------------------- duplicate keys


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model: {pretrained: x/y}\ndata: {source: digits}\ntrain:\n  max_steps: 2\n  batch_size: 8\n"
            "  max_steps: 3\n",
            "sets train.max_steps twice (lines 4 and 6); keep one of them",
        ),
        (
            "model: {pretrained: x/y}\ntrain:\n  max_steps: 2\ndata: {source: digits}\ntrain: {batch_size: 8}\n",
            "sets train twice (lines 2 and 5); merge them into one section",
        ),
        (
            "model: {pretrained: x/y, pretrained: a/b}\n",
            "sets model.pretrained twice (lines 1 and 1); keep one of them",
        ),
    ],
)
def test_duplicate_yaml_keys_are_refused(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config file {str(path)!r} {message}"


def test_one_key_in_several_mappings_and_aliases_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        "model: {pretrained: x/y}\n"
        "data: {source: digits, classes: &c [1, 2]}\n"
        "bank: {seed: &s 1}\n"
        "train: {seed: *s, max_steps: 3}\n"
        "objective: {bank_share: 0}\n"
        "tuning: {difffit_blocks: *c}\n"
    )
    with pytest.raises(
        ConfigError, match="tuning.difffit.blocks=\\[1, 2\\] is a setting of tuning.method=difffit"
    ):
        load_config(path)
    cfg = load_config(path, ["tuning.method=difffit"])
    assert (
        cfg.bank.sampling.seed == cfg.train.seed == 1
        and cfg.data.classes == cfg.tuning.difffit.blocks == [1, 2]
    )


# ------------------------------------------------------------------------------- the default max_steps


def test_a_config_without_max_steps_is_marked(tmp_path: Path) -> None:
    unset = load_config(None, BASE[:-1])
    assert unset.default_steps and unset.train.max_steps == 24000
    assert not load_config(None, [*BASE[:-1], "train.max_steps=24000"]).default_steps
    path = tmp_path / "c.yaml"
    raw = {"model": {"pretrained": "x/y"}, "data": {"source": "digits"}, "objective": {"bank_share": 0}}
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).default_steps
    unset.save(tmp_path / "saved.yaml")
    assert not load_config(tmp_path / "saved.yaml").default_steps  # a saved config states it
    assert "unset" not in yaml.safe_load((tmp_path / "saved.yaml").read_text())


def test_the_dry_run_says_the_default_steps_apply(
    dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = {
        "model": {"pretrained": str(dit_dir)},
        "data": {"source": "digits", "classes": [5, 6, 7], "per_class": 4},
        "objective": {"bank_share": 0.0},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 8},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    note = "train.max_steps is not set: the default of 24,000 steps applies (set train.max_steps to choose)"
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    assert f"note       {note}" in capsys.readouterr().out
    assert main(["train", "--config", str(path), "--dry-run", "--set", "train.max_steps=24000"]) == 0
    assert "is not set" not in capsys.readouterr().out


def test_a_run_says_the_default_steps_apply(
    dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_cfg(dit_dir, tmp_path / "run", None, "train.max_steps=1")
    assert not cfg.default_steps
    Trainer(cfg).train()
    assert "is not set" not in capsys.readouterr().out
    # a run whose config left max_steps out (marked so by hand: a short run that ends)
    cfg = make_cfg(dit_dir, tmp_path / "unset", None, "train.max_steps=1")
    Trainer(dataclasses.replace(cfg, unset=frozenset({"train.max_steps"}))).train()
    assert "[difftune] train.max_steps is not set: the default of 1 steps applies" in capsys.readouterr().out
