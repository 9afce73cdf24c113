"""Review: resuming a run whose checkpoint predates a setting compares that setting with its default."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from difftune.config.experiment import ExperimentConfig, load_config
from difftune.errors import UserError
from difftune.schedules.ports import resolve_port
from difftune.training.run_dir import check_resume_config, config_changes

BASE = ["model.pretrained=x", "data.source=digits", "bank.path=b"]


def _checkpoint_without(tmp_path: Path, *keys: str) -> Path:
    """A checkpoint whose config.yaml was written before the dotted ``keys`` existed."""
    saved = load_config(None, BASE).to_dict()
    for key in keys:
        section, *inner, name = key.split(".")
        values = saved[section]
        for part in inner:
            values = values[part]
        del values[name]
    checkpoint = tmp_path / "checkpoint-0000002"
    checkpoint.mkdir()
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return checkpoint


def _resolved(overrides: list[str], process: str = "ddpm") -> ExperimentConfig:
    """The config as a run compares it: ``objective.power.axis: auto`` made concrete for ``process``."""
    cfg = load_config(None, overrides)
    return replace(cfg, objective=resolve_port(cfg.objective, process))


def test_a_setting_added_since_the_checkpoint_counts_as_its_default(tmp_path: Path) -> None:
    checkpoint = _checkpoint_without(tmp_path, "objective.power.axis", "train.sampling.seed")
    check_resume_config(_resolved(BASE), checkpoint)  # unchanged: accepted
    with pytest.raises(UserError, match=r"objective\.power\.axis: 'index' -> 'log_snr'"):
        check_resume_config(_resolved([*BASE, "objective.power.axis=log_snr"]), checkpoint)
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text())
    current = _resolved([*BASE, "train.sampling.seed=3"]).to_dict()
    assert config_changes(saved, current) == (["train.sampling.seed: 0 -> 3"], [])


def test_a_checkpoint_from_before_auto_resumes_with_the_axis_it_had(tmp_path: Path) -> None:
    # a checkpoint written when the default was index, with the key spelled out
    saved = load_config(None, [*BASE, "objective.power.axis=index"]).to_dict()
    checkpoint = tmp_path / "checkpoint-0000004"
    checkpoint.mkdir()
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    check_resume_config(_resolved(BASE), checkpoint)  # auto on DDPM is index: the same run
    assert config_changes(saved, _resolved(BASE).to_dict()) == ([], [])
