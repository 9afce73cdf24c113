"""Resuming a run: its logs are rewound, a damaged newest checkpoint is passed over, and the settings
that name the command (not the run) are not reported as changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from difftune.errors import UserError
from difftune.testing.models import save_pipeline_dir, tiny_dit
from difftune.training.loop import Trainer, train_model
from difftune.training.run_dir import LOG_FILES, config_changes, rewind_logs
from test_stable_diffusion import _config, captions, sd_dir  # noqa: F401 (fixtures)
from test_training import make_cfg, metrics, weights

ARGS = ("train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.ema_decay=0.9")


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------- per-step logs


def test_every_log_is_rewound_to_the_step_the_run_starts_from(tmp_path: Path) -> None:
    for name in LOG_FILES:
        lines = [json.dumps({"step": step, "x": 1.0}) for step in (0, 2, 4)]
        (tmp_path / name).write_text("\n".join(lines) + '\n{"step": 6, "x')  # the last torn by a kill
    rewind_logs(tmp_path, 2)
    assert {name: _steps(tmp_path / name) for name in LOG_FILES} == {name: [0, 2] for name in LOG_FILES}
    rewind_logs(tmp_path, 0)  # a run starting at step 0 logs step 0 (its first validation) again
    assert {name: (tmp_path / name).read_text() for name in LOG_FILES} == {name: "" for name in LOG_FILES}


def test_a_controlnet_run_killed_before_its_first_checkpoint_logs_step_0_once(
    sd_dir: Path,  # noqa: F811
    captions: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    cfg = _config(
        sd_dir,
        captions,
        tmp_path,
        model={"controlnet": "from_unet"},
        data={"annotator": "canny", "cache_dir": str(tmp_path / "cache")},
        objective={"bank_share": 0},
        train={"max_steps": 1, "validation_every": 1, "validation_samples": 2},
    )
    run = tmp_path / "run"
    train_model(cfg)
    whole = {name: (run / name).read_text() for name in LOG_FILES}
    assert _steps(run / "fidelity.jsonl") == [0, 1]
    # as a run killed after its step-0 validation, before step 1 and its checkpoint
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "final")
    (run / "metrics.jsonl").write_text("")
    (run / "fidelity.jsonl").write_text(whole["fidelity.jsonl"].splitlines(keepends=True)[0])
    cfg.train.resume = "latest"
    train_model(cfg)
    assert {name: (run / name).read_text() for name in LOG_FILES} == whole


# ------------------------------------------------------------------------ damaged newest checkpoint


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished 2-step run with a checkpoint at each step (EMA on), and its model."""
    root = tmp_path_factory.mktemp("two")
    model = save_pipeline_dir(root / "dit", tiny_dit(), "transformer")
    Trainer(make_cfg(model, root / "run", None, *ARGS)).train()
    return model, root / "run"


def _cut_in_a_quoted_value(data: bytes) -> bytes:
    """A config.yaml cut inside a quoted string (a cut elsewhere may parse)."""
    return data[: data.index(b"caption_template: '") + len(b"caption_template: '") + 1]


@pytest.mark.parametrize(
    "name",
    [
        "state/model.safetensors",
        "state/optimizer.bin",
        "state/random_states_0.pkl",
        "state/difftune_loop.json",
        "state/difftune_ema.safetensors",
        "state/difftune_ema.json",
        "config.yaml",
    ],
)
def test_resume_passes_over_any_damaged_file_of_the_newest_checkpoint(
    two_checkpoints: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    model, clean = two_checkpoints
    run = shutil.copytree(clean, tmp_path / "run")
    shutil.rmtree(run / "final")  # as if killed before final/, with the newest checkpoint damaged on disk
    damaged = run / "checkpoints" / "checkpoint-0000002" / name
    data = damaged.read_bytes()
    damaged.write_bytes(_cut_in_a_quoted_value(data) if name == "config.yaml" else data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        final = Trainer(make_cfg(model, run, None, *ARGS, "train.resume=latest")).train()
    assert f"not resuming from {run / 'checkpoints' / 'checkpoint-0000002'}: {name} is damaged" in caplog.text
    assert (run / "checkpoints" / "damaged-checkpoint-0000002" / name).is_file()  # kept, out of the way
    for sub in ("transformer", "ema/transformer"):  # step 2 redone from step 1: the same weights
        a, b = weights(final, sub), weights(clean / "final", sub)
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    assert [row["step"] for row in metrics(run)] == [1, 2]


def test_a_damaged_checkpoint_given_by_path_is_refused_in_one_line(
    two_checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    model, clean = two_checkpoints
    run = shutil.copytree(clean, tmp_path / "run")
    optimizer = run / "checkpoints" / "checkpoint-0000002" / "state" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    cfg = make_cfg(model, run, None, *ARGS, f"train.resume={optimizer.parents[1]}")
    with pytest.raises(UserError, match=r"cannot be resumed from: state/optimizer\.bin is damaged"):
        Trainer(cfg).train()


# ---------------------------------------------------------------------------------- changed settings


def test_the_folder_and_the_resume_flags_are_not_changed_settings(
    two_checkpoints: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, clean = two_checkpoints
    moved = shutil.copytree(clean, tmp_path / "moved")  # a run folder moved elsewhere, then resumed
    args = (*ARGS[1:], "train.max_steps=3", "train.resume=latest", "train.overwrite=true")
    with caplog.at_level("WARNING"):
        Trainer(make_cfg(model, moved, None, *args, "train.accept_config_changes=true")).train()
    assert "changed settings: train.max_steps: 2 -> 3" in caplog.text
    assert not any(f"train.{key}" in caplog.text for key in ("output_dir", "resume", "overwrite", "accept"))
    saved = {"train": {"output_dir": "a", "resume": None, "seed": 0}}
    current = {"train": {"output_dir": "b", "resume": "latest", "seed": 1}}
    assert config_changes(saved, current) == ([], ["train.seed: 0 -> 1"])


def test_resume_latest_over_only_damaged_checkpoints_says_so_in_one_line(
    two_checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    model, clean = two_checkpoints
    run = shutil.copytree(clean, tmp_path / "run")
    shutil.rmtree(run / "final")
    for checkpoint in (run / "checkpoints").iterdir():
        weights_file = checkpoint / "state" / "optimizer.bin"
        weights_file.write_bytes(weights_file.read_bytes()[:100])
    with pytest.raises(UserError, match=r"every checkpoint in .* is damaged .*train\.overwrite=true"):
        Trainer(make_cfg(model, run, None, *ARGS, "train.resume=latest")).train()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint-0000001",
        "checkpoint-0000002",
    ]
