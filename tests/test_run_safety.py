"""A run never destroys or mixes with another: output folders, locks, caches, non-finite losses."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.fsdp import CPUOffloadPolicy

from difftune.backbones import load_pretrained
from difftune.bank import generate_bank
from difftune.cli import main
from difftune.config.experiment import ConfigError, load_config
from difftune.errors import UserError
from difftune.training.divergence import TrainingDiverged
from difftune.training.loop import Trainer
from difftune.training.run_dir import LOCK_FILE, RunLock
from test_training import make_cfg, metrics, weights


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


# ------------------------------------------------------------------------------------ output folders


def test_fresh_run_into_an_earlier_run_is_refused_and_overwrite_replaces_it(
    dit_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    Trainer(make_cfg(dit_dir, run, None, "train.max_steps=2", "train.checkpoint_every=1")).train()
    before = _files(run / "final")
    other_seed = ("train.max_steps=2", "train.checkpoint_every=1", "train.seed=7")
    with pytest.raises(
        UserError, match=r"holds an earlier run \(2 checkpoints, final/\).*train.resume=latest"
    ):
        Trainer(make_cfg(dit_dir, run, None, *other_seed)).train()
    assert _files(run / "final") == before  # the earlier run's weights are not published as this run's

    final = Trainer(make_cfg(dit_dir, run, None, *other_seed, "train.overwrite=true")).train()
    alone = Trainer(make_cfg(dit_dir, tmp_path / "alone", None, *other_seed)).train()
    a, b = weights(final), weights(alone)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the new run's own weights, not a mix
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # no lines of the earlier run


def test_resume_from_an_older_checkpoint_needs_overwrite(dit_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(make_cfg(dit_dir, run, None, "train.max_steps=4", "train.checkpoint_every=1")).train()
    older = run / "checkpoints" / "checkpoint-0000002"
    cfg = make_cfg(
        dit_dir, run, None, "train.max_steps=4", "train.checkpoint_every=1", f"train.resume={older}"
    )
    with pytest.raises(UserError, match="would abandon 2 newer checkpoints"):
        Trainer(cfg).train()
    assert (run / "checkpoints" / "checkpoint-0000004").is_dir()
    cfg.train.overwrite = True
    Trainer(cfg).train()  # steps 3 and 4 again, from step 2
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [
        "checkpoint-0000002",
        "checkpoint-0000003",
        "checkpoint-0000004",
    ]


# ------------------------------------------------------------------------------------------ the lock


def test_a_second_run_into_a_folder_in_use_is_refused(dit_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(UserError, match=f"in use by another run \\(process {os.getpid()}"):
        Trainer(make_cfg(dit_dir, run, None, "train.max_steps=1")).train()
    assert not (run / "checkpoints").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_and_released(dit_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    Trainer(make_cfg(dit_dir, run, None, "train.max_steps=1")).train()
    assert not (run / LOCK_FILE).exists()  # released at the end
    lock = RunLock(run)
    with lock, pytest.raises(UserError, match="in use"):
        RunLock(run).acquire()
    assert not (run / LOCK_FILE).exists()


def test_the_lock_is_released_when_a_run_fails(dit_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged):
        Trainer(make_cfg(dit_dir, run, None, "train.max_steps=3", "train.learning_rate=1e30")).train()
    assert not (run / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------- target cache


def test_cache_dir_never_deletes_another_store(dit_dir: Path, tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    cfg = make_cfg(dit_dir, tmp_path / "run", bank)
    generate_bank(load_pretrained(str(dit_dir)), cfg.bank, progress=False)
    before = _files(bank)
    with pytest.raises(UserError, match="holds a 'bank' store, not a target cache"):
        Trainer(make_cfg(dit_dir, tmp_path / "run", bank, f"data.cache_dir={bank}"))
    assert _files(bank) == before


def test_rebuilding_a_stale_cache_deletes_only_its_own_files(dit_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    Trainer(make_cfg(dit_dir, tmp_path / "a", None, f"data.cache_dir={cache}"))
    (cache / "notes.txt").write_text("mine")
    Trainer(
        make_cfg(dit_dir, tmp_path / "b", None, f"data.cache_dir={cache}", "data.per_class=3")
    )  # other data
    assert (cache / "notes.txt").read_text() == "mine"
    assert json.loads((cache / "manifest.json").read_text())["num_samples"] == 15


def test_a_damaged_cache_shard_is_encoded_again(
    dit_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    first = Trainer(make_cfg(dit_dir, tmp_path / "a", None, f"data.cache_dir={cache}")).target.samples[:]
    shard = cache / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with caplog.at_level("WARNING", logger="difftune.io.store"):
        again = Trainer(make_cfg(dit_dir, tmp_path / "b", None, f"data.cache_dir={cache}")).target.samples[:]
    assert torch.equal(again, first)
    assert [r.getMessage() for r in caplog.records if "shard-00000.safetensors" in r.getMessage()]


# ------------------------------------------------------------------------------------ non-finite loss


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    dit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from difftune.objectives import DiffTuningLoss

    original, calls = DiffTuningLoss.__call__, []

    def diverging(self, *args):  # from the 4th step on, every loss is NaN (as after a blow-up)
        terms = original(self, *args)
        calls.append(1)
        if len(calls) > 3:
            terms.loss = terms.loss * float("nan")
        return terms

    run = tmp_path / "run"
    args = ("train.max_steps=6", "train.checkpoint_every=1", "train.log_every=5")
    with monkeypatch.context() as m:
        m.setattr(DiffTuningLoss, "__call__", diverging)
        with pytest.raises(TrainingDiverged, match=r"non-finite at step 4 \(target t .*checkpoint-0000003"):
            Trainer(make_cfg(dit_dir, run, None, *args)).train()
    found = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert found[-1] == "checkpoint-0000003"  # nothing written from non-finite weights
    assert not (run / "final").exists()
    saved = load_file(
        str(
            run
            / "checkpoints"
            / "checkpoint-0000003"
            / "model"
            / "transformer"
            / "diffusion_pytorch_model.safetensors"
        )
    )
    assert all(torch.isfinite(t).all() for t in saved.values())
    # the surviving checkpoint resumes, to the same weights as a run that never diverged
    final = Trainer(make_cfg(dit_dir, run, None, *args, "train.resume=latest")).train()
    clean = Trainer(make_cfg(dit_dir, tmp_path / "clean", None, *args)).train()
    a, b = weights(final), weights(clean)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _nan_at(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int]) -> None:
    """Make the loss of the given (1-based) objective calls NaN, as a bad batch or an overflow would."""
    from difftune.objectives import DiffTuningLoss

    original, calls = DiffTuningLoss.__call__, []

    def sometimes_nan(self, *args):
        terms = original(self, *args)
        calls.append(1)
        if len(calls) in bad_calls:
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(DiffTuningLoss, "__call__", sometimes_nan)


def _checkpoint_weights(run: Path, step: int, sub: str = "transformer") -> dict[str, torch.Tensor]:
    return weights(run / "checkpoints" / f"checkpoint-{step:07d}" / "model", sub)


@pytest.mark.parametrize("clip", ["train.max_grad_norm=0", "train.max_grad_norm=1.0"])  # its norm is reused
def test_skip_leaves_weights_and_optimiser_untouched_at_non_finite_steps(
    clip: str, dit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    run = tmp_path / "run"
    args = (
        "train.max_steps=6",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=10",
        "train.log_every=2",
        "train.on_non_finite=skip",
        "train.max_non_finite_steps=2",
        clip,
    )
    _nan_at(monkeypatch, {3, 4})  # steps 3 and 4
    Trainer(make_cfg(dit_dir, run, None, *args)).train()
    before, at3, at4, at5 = (_checkpoint_weights(run, s) for s in (2, 3, 4, 5))
    assert all(torch.equal(before[k], at3[k]) and torch.equal(before[k], at4[k]) for k in before)
    assert any(not torch.equal(before[k], at5[k]) for k in before)  # finite steps train again
    optimiser = [
        torch.load(run / "checkpoints" / f"checkpoint-{s:07d}" / "state" / "optimizer.bin", weights_only=True)
        for s in (2, 4)
    ]
    moments = [[v for state in o["state"].values() for v in state.values()] for o in optimiser]
    assert len(moments[0]) > 0 and all(torch.equal(a, b) for a, b in zip(*moments, strict=True))
    for step in range(1, 7):
        assert all(torch.isfinite(t).all() for t in _checkpoint_weights(run, step).values())
    logged = {m["step"]: m for m in metrics(run)}
    assert logged[4]["non_finite_samples"] == 20 and "non_finite_samples" not in logged[6]  # 2 steps x 10
    assert math.isfinite(logged[2]["loss/total"]) and math.isfinite(logged[6]["loss/total"])
    assert math.isnan(logged[4]["loss/total"])  # no finite sample in steps 3-4 to average
    assert "skipped 2 step(s) with a non-finite loss so far (the first at step 3" in caplog.text


def test_skip_stops_after_more_than_the_allowed_steps(
    dit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    args = (
        "train.max_steps=8",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=10",
        "train.log_every=1",
        "train.on_non_finite=skip",
        "train.max_non_finite_steps=1",
    )
    _nan_at(monkeypatch, set(range(4, 20)))  # from step 4 on
    with pytest.raises(
        TrainingDiverged,
        match=r"2 steps had a non-finite loss \(the first at step 4: target t .*max_non_finite_steps=1",
    ):
        Trainer(make_cfg(dit_dir, run, None, *args)).train()
    found = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert found[-1] == "checkpoint-0000004"  # step 5 went bad beyond the limit: nothing written from it
    three, four = _checkpoint_weights(run, 3), _checkpoint_weights(run, 4)
    assert all(torch.equal(three[k], four[k]) for k in three)  # step 4 was skipped
    assert not (run / "final").exists()


def test_a_blow_up_is_one_line_on_the_command_line(dit_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    # lr 1e30: the first step is finite, its update makes the next loss non-finite
    make_cfg(dit_dir, tmp_path / "cli", None, "train.max_steps=4", "train.learning_rate=1e30").save(cfg)
    assert main(["train", "--config", str(cfg)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("difftune: error:")]
    assert len(errors) == 1 and "non-finite at step 2" in errors[0]


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.batch_size=2.5", "train.batch_size=2.5 must be int"),
        ("train.max_steps=2.5", "train.max_steps=2.5 must be int"),
        ("train.learning_rate=.inf", "train.learning_rate=inf must be a finite number"),
        ("train.learning_rate=.nan", "train.learning_rate=nan must be a finite number"),
        ("train.learning_rate=fast", "train.learning_rate='fast' must be float"),
        ("data.classes=[1,x]", "data.classes=[1, 'x'] must be list[int] or None"),
        ("train.overwrite=3", "train.overwrite=3 must be bool"),
        ("objective.bank_weight=yes", "objective.bank_weight=True must be float"),
    ],
)
def test_wrong_types_and_non_finite_values_name_their_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.pretrained=x/y", "data.source=digits", override])
    assert str(err.value) == message


# ---------------------------------------------------------------------------------- resume settings


def test_resume_applies_a_changed_learning_rate_and_refuses_another_run(
    dit_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    Trainer(make_cfg(dit_dir, run, None, "train.max_steps=2", "train.checkpoint_every=1")).train()
    with caplog.at_level("WARNING"):
        trainer = Trainer(
            make_cfg(
                dit_dir, run, None, "train.max_steps=3", "train.resume=latest", "train.learning_rate=3e-5"
            )
        )
        trainer.train()
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {3e-5}  # not the checkpoint's 1e-4
    assert "train.learning_rate: 0.0001 -> 3e-05" in caplog.text

    changed = ("train.max_steps=4", "train.resume=latest", "train.batch_size=6", "train.seed=3")
    with pytest.raises(UserError, match=r"other settings \(train.batch_size: 10 -> 6; train.seed: 0 -> 3\)"):
        Trainer(make_cfg(dit_dir, run, None, *changed)).train()
    assert (run / "final" / "config.yaml").is_file()
    Trainer(make_cfg(dit_dir, run, None, *changed, "train.accept_config_changes=true")).train()
    assert (run / "checkpoints" / "checkpoint-0000004").is_dir()


def test_a_run_says_what_it_trains_on(dit_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    Trainer(make_cfg(dit_dir, run, None, "train.max_steps=2", "train.checkpoint_every=1")).train()
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["classes"] == {"5": 0, "6": 1, "7": 2, "8": 3, "9": 4}
    assert summary["target_samples"] == 20 and summary["bank_samples"] == 0
    assert summary["batch"] == {"target": 10, "bank": 0} and summary["resume_from"] is None
    assert summary["tuning"] == "full" and summary["trainable_share"] == 1.0
    assert "20 target images in 5 classes (5=0, 6=1, 7=2, 8=3, 9=4)" in capsys.readouterr().out
    Trainer(make_cfg(dit_dir, run, None, "train.max_steps=3", "train.resume=latest")).train()
    resumed = json.loads((run / "run_summary.json").read_text())["resume_from"]
    assert resumed["step"] == 2 and resumed["checkpoint"].endswith("checkpoint-0000002")
    assert "resuming at step 2" in capsys.readouterr().out


# ------------------------------------------------------------------------- damaged and odd inputs


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(
    dit_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = ("train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3")
    clean = Trainer(make_cfg(dit_dir, tmp_path / "clean", None, *args)).train()
    run = tmp_path / "run"
    Trainer(make_cfg(dit_dir, run, None, *args)).train()
    shutil.rmtree(run / "final")  # as if killed before final/, with the newest checkpoint damaged on disk
    newest = run / "checkpoints" / "checkpoint-0000003" / "state" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss/tot')  # and a line torn by the kill
    with caplog.at_level("WARNING"):
        final = Trainer(make_cfg(dit_dir, run, None, *args, "train.resume=latest")).train()
    assert "not resuming from" in caplog.text and "checkpoint-0000003" in caplog.text
    assert (run / "checkpoints" / "damaged-checkpoint-0000003").is_dir()  # kept, out of the way
    a, b = weights(final), weights(clean)
    assert all(torch.equal(a[k], b[k]) for k in a)  # step 3 redone from step 2: the same weights
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_model_paths_that_are_files_or_typos_are_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert main(["sample", "--dry-run", "--model", str(tmp_path / "model.safetensors")]) == 2
    assert "is a file; give the model's directory" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["sample", "--dry-run", "--model", "runs/typo"]) == 2  # not tried as a hub id
    assert "although runs/ does here" in capsys.readouterr().err


def test_a_single_model_directory_uses_its_own_schedule(tmp_path: Path, caplog) -> None:
    from diffusers import DDPMScheduler

    from conftest import tiny_dit

    tiny_dit().save_pretrained(tmp_path / "m")
    DDPMScheduler(num_train_timesteps=500, beta_end=0.03).save_pretrained(
        tmp_path / "m"
    )  # scheduler_config.json
    loaded = load_pretrained(str(tmp_path / "m"))
    assert (
        loaded.scheduler_config["num_train_timesteps"] == 500 and loaded.scheduler_config["beta_end"] == 0.03
    )
    tiny_dit().save_pretrained(tmp_path / "bare")
    with caplog.at_level("WARNING"):
        assert load_pretrained(str(tmp_path / "bare")).scheduler_config["num_train_timesteps"] == 1000
    assert "has no noise schedule (scheduler/); using difftune's default" in caplog.text  # said, not silent


def test_a_bank_share_that_rounds_to_no_bank_sample_is_refused() -> None:
    with pytest.raises(ConfigError, match="rounds to 0 bank samples per batch"):
        load_config(
            None,
            [
                "model.pretrained=x/y",
                "data.source=digits",
                "bank.path=b",
                "objective.bank_share=0.05",
                "train.batch_size=8",
            ],
        )


def test_a_protected_path_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import difftune.demos.digits

    def protected(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr(difftune.demos.settings, "DemoSettings", protected)
    assert main(["demo", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied" in err


@pytest.mark.parametrize("error", ["os", "safetensors", "torch"])  # each library reports it its own way
def test_a_full_disk_during_a_checkpoint_loses_nothing(
    error: str, dit_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import errno

    from safetensors import SafetensorError

    import difftune.training.checkpoint_files
    import difftune.training.loop

    original, calls = difftune.training.checkpoint_files.save_model, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if error == "os":
                raise OSError(errno.ENOSPC, "No space left on device")
            if error == "safetensors":
                raise SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 1758080 vs 1757972"
            )
        return original(*args, **kwargs)

    args = ("train.max_steps=3", "train.checkpoint_every=1")
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(difftune.training.checkpoint_files, "save_model", full_disk)
        if error != "os":  # the disk is seen full when the write fails
            m.setattr(difftune.training.loop, "FULL_DISK_BYTES", 2**62)
        with pytest.raises(
            UserError,
            match=r"could not write checkpoint-0000002 \(No space left on device\).*"
            r"checkpoint-0000001",
        ):
            Trainer(make_cfg(dit_dir, run, None, *args)).train()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint-0000001"
    ]  # no half-written one
    assert not (run / "final").exists() and not (run / LOCK_FILE).exists()
    final = Trainer(make_cfg(dit_dir, run, None, *args, "train.resume=latest")).train()
    clean = Trainer(make_cfg(dit_dir, tmp_path / "clean", None, *args)).train()
    a, b = weights(final), weights(clean)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_launch_whose_processes_do_not_join_is_refused(dit_dir: Path, tmp_path: Path, monkeypatch):
    # what plain torchrun on a machine without a GPU does: 2 processes, each its own accelerate run
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="ACCELERATE_USE_CPU=1") as err:
        Trainer(make_cfg(dit_dir, tmp_path / "run", None))
    assert "launcher started 2 processes" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _launch(kind: str, fsdp2: bool = True):  # noqa: ANN202
    """What check_parallelism reads of an accelerator launched as ``kind``."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(
        state_dict_type="StateDictType.SHARDED_STATE_DICT", cpu_offload=None, activation_checkpointing=False
    )
    return SimpleNamespace(
        num_processes=1,
        distributed_type=DistributedType[kind],
        is_fsdp2=fsdp2,
        state=SimpleNamespace(fsdp_plugin=plugin),
    )


@pytest.mark.parametrize(
    ("kind", "fsdp2", "message"),
    [
        ("DEEPSPEED", True, "configured for DEEPSPEED, which difftune does not train under"),
        ("MEGATRON_LM", True, "configured for MEGATRON_LM, which difftune does not train under"),
        ("FSDP", False, "FSDP version 1; difftune shards with FSDP2"),
    ],
)
def test_unsupported_sharding_is_refused_before_anything_is_written(
    dit_dir: Path, tmp_path: Path, kind: str, fsdp2: bool, message: str
):
    with pytest.raises(UserError, match=message) as err:
        Trainer(make_cfg(dit_dir, tmp_path / "run", None), accelerator=_launch(kind, fsdp2))
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        ({"state_dict_type": "StateDictType.FULL_STATE_DICT"}, "fsdp_state_dict_type is FULL_STATE_DICT"),
        ({"cpu_offload": CPUOffloadPolicy()}, "fsdp_offload_params: true is not supported"),
        ({"activation_checkpointing": True}, "fsdp_activation_checkpointing: true is not supported"),
    ],
)
def test_fsdp2_refuses_a_checkpoint_format_or_offload_it_does_not_handle(
    dit_dir: Path, tmp_path: Path, plugin: dict, message: str
):
    launch = _launch("FSDP")
    launch.state.fsdp_plugin.__dict__.update(plugin)
    with pytest.raises(UserError, match=message) as err:
        Trainer(make_cfg(dit_dir, tmp_path / "run", None), accelerator=launch)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "setting",
    [
        "train.compile=full",
        "train.optimizer=adamw_8bit",
        "objective.target_schedule=data_driven",
    ],
)
def test_fsdp2_refuses_what_runs_the_model_on_one_process(dit_dir: Path, tmp_path: Path, setting: str):
    key = setting.split("=")[0]
    with pytest.raises(UserError, match=key) as err:
        Trainer(make_cfg(dit_dir, tmp_path / "run", None, setting), accelerator=_launch("FSDP"))
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


def test_data_parallel_and_fsdp2_launches_pass_the_check(dit_dir: Path):
    from difftune.training.sharding import check_parallelism

    cfg = make_cfg(dit_dir, dit_dir / "unused", None)
    for kind in ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP"):
        check_parallelism(_launch(kind), cfg)
