"""Start-up: ``--help`` and refusals of a bad config come before torch, diffusers or transformers is
imported; loading a model shows no per-model "Loading weights" bar; the heavy registries agree with the
light names a config is checked against."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from difftune.cli import build_parser
from difftune.testing.models import save_sd_pipeline

# runs difftune.cli.main in a fresh interpreter, then reports on a last stdout line which heavy libraries
# it imported and torch's float32 matmul precision
PROBE = """
import json, sys
import difftune.cli
try:
    code = difftune.cli.main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
torch = sys.modules.get("torch")
print(json.dumps({
    "heavy": [name for name in ("torch", "diffusers", "transformers") if name in sys.modules],
    "precision": torch.get_float32_matmul_precision() if torch else None,
}))
sys.exit(code)
"""


def _run_cli(args: list[str], cwd: Path) -> tuple[int, str, str, dict]:
    """``difftune ARGS`` in a subprocess: exit code, stdout (without the report), stderr, the report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    *out, report = done.stdout.splitlines()
    return done.returncode, "\n".join(out), done.stderr, json.loads(report)


def _commands() -> list[list[str]]:
    """``--help`` of difftune and of every subcommand (``eval fid`` too)."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    names = [[name] for name in sub.choices] + [["eval", "fid"]]
    return [["--help"]] + [[*name, "--help"] for name in names]


@pytest.mark.parametrize("args", _commands(), ids=" ".join)
def test_help_imports_no_heavy_library(args: list[str], tmp_path: Path) -> None:
    code, out, err, report = _run_cli(args, tmp_path)
    assert code == 0, err
    assert "usage: difftune" in out
    assert report["heavy"] == []


# a config that passes every check but the one its case breaks: (changed settings, the refusal)
BAD_CONFIGS = {
    "unknown key": ({"model": {"bogus": 1}}, r"unknown key\(s\) \['bogus'\] in section 'model'"),
    "bad value": ({"train": {"learning_rate": -1}}, r"train\.learning_rate=-1 must be > 0"),
    "unknown tuning": ({"tuning": {"method": "loraa"}}, r"tuning\.method='loraa' is unknown"),
    "unknown schedule": (
        {"objective": {"target_schedule": "powerup"}},
        r"objective\.target_schedule='powerup' is unknown",
    ),
    "missing model": ({"model": {"pretrained": "./no-such-model"}}, r"'\./no-such-model' does not exist"),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_refusal_imports_no_heavy_library(case: str, dry_run: bool, tmp_path: Path) -> None:
    changes, problem = BAD_CONFIGS[case]
    (tmp_path / "model").mkdir()
    (tmp_path / "data" / "class0").mkdir(parents=True)
    config = {
        "model": {"pretrained": str(tmp_path / "model")},
        "data": {"path": str(tmp_path / "data")},
        "objective": {"bank_share": 0},
    }
    for section, settings in changes.items():
        config.setdefault(section, {}).update(settings)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    args = ["train", "--config", str(tmp_path / "c.yaml")] + (["--dry-run"] if dry_run else [])
    code, out, err, report = _run_cli(args, tmp_path)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("difftune: error: "), err
    assert re.search(problem, lines[0]), lines[0]
    assert report["heavy"] == []


def test_loading_a_pipeline_shows_no_loading_bar(tmp_path: Path) -> None:
    """``difftune sample`` from a Stable Diffusion pipeline: difftune's own sampling bar, none for loading
    the text encoder (transformers) or the UNet and VAE (diffusers); TF32 matmuls are allowed as before."""
    sd = save_sd_pipeline(tmp_path / "sd")
    args = ["sample", "--model", str(sd), "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path / "out")]
    code, out, err, report = _run_cli(args, tmp_path)
    assert code == 0, err
    assert "sampling" in err
    assert "Loading" not in err
    assert report["precision"] == "high"


def test_loading_restores_the_libraries_bar_settings(tmp_path: Path) -> None:
    """The bars are hidden while a model loads only: afterwards transformers, diffusers and the hub show
    bars as they did before."""
    import huggingface_hub.utils as hub
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel
    from transformers.utils import logging as transformers_logging

    from difftune.backbones.loading import load_safetensors_model

    def settings() -> tuple[bool, bool, bool]:
        return (
            transformers_logging.is_progress_bar_enabled(),
            diffusers_logging.is_progress_bar_enabled(),
            hub.are_progress_bars_disabled(),
        )

    sd = save_sd_pipeline(tmp_path / "sd")
    before = settings()
    load_safetensors_model(CLIPTextModel, str(sd), "text_encoder", None)
    assert settings() == before


def test_registries_agree_with_their_light_names() -> None:
    """A config is checked against names known without torch; each names what the heavy module builds."""
    from difftune import control, objectives, tuning
    from difftune.config.names import (
        FITTED_SCHEDULE_NAMES,
        NOISE_LEVEL_SCHEDULE_NAMES,
        OBJECTIVE_NAMES,
        SCHEDULE_NAMES,
        SNR_SCHEDULE_NAMES,
        TUNING_METHOD_NAMES,
    )
    from difftune.schedules import base as schedules

    assert set(schedules.SCHEDULES) == set(SCHEDULE_NAMES)
    assert set(schedules.SNR_SCHEDULES) == set(SNR_SCHEDULE_NAMES)
    assert set(schedules.FITTED_SCHEDULES) == set(FITTED_SCHEDULE_NAMES)
    assert set(schedules.NOISE_LEVEL_SCHEDULES) == set(NOISE_LEVEL_SCHEDULE_NAMES)
    assert set(objectives.OBJECTIVES) == set(OBJECTIVE_NAMES)
    assert set(tuning.TUNING_METHODS) == set(TUNING_METHOD_NAMES)
    for package in (tuning, objectives, control):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    for name, build in tuning.TUNING_METHODS.items():
        assert callable(build(tuning.TuningConfig()).prepare), name
