"""Same weights, same images: a model samples on one timestep grid however it is loaded (its run
folder, ``final/``, a merged export, the base model, the bank), with or without a noise schedule of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, DiTPipeline

from difftune.backbones import Conditioning, load_pretrained, load_trained
from difftune.backbones.adapters import merged_model
from difftune.backbones.noise_schedule import DEFAULT_NOISE_SCHEDULE, SCHEDULER_FILE
from difftune.bank import generate_bank
from difftune.cli import main
from difftune.config.sampling import SamplingSpec
from difftune.sampling.generate import build_scheduler, generate_with_spec
from difftune.testing.models import tiny_dit, tiny_vae
from difftune.training.loop import Trainer
from test_training import make_cfg

SPEC = SamplingSpec(steps=4, guidance_scale=1.5)
SAMPLERS = ("DPMSolverMultistepScheduler", "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler")


def _bare_model(root: Path) -> Path:
    """A tiny pixel DiT saved alone: config.json and weights, no ``scheduler/``."""
    tiny_dit().save_pretrained(root)
    assert not (root / "scheduler").exists()
    return root


def _images(loaded, seed: int = 0) -> torch.Tensor:
    cond = Conditioning({"labels": torch.tensor([0, 1, 2])})
    return generate_with_spec(loaded.backbone.eval(), loaded.scheduler_config, SPEC, cond, seed)


def _grid(loaded, sampler: str) -> list[int]:
    scheduler = build_scheduler(sampler, loaded.scheduler_config)
    scheduler.set_timesteps(SPEC.steps)
    return scheduler.timesteps.tolist()


def test_an_adapter_run_its_merged_export_and_its_base_with_the_merged_delta_sample_alike(
    tmp_path: Path,
) -> None:
    base_dir = _bare_model(tmp_path / "base")
    cfg = make_cfg(base_dir, tmp_path / "run", None, "tuning.method=bitfit", "train.learning_rate=1e-2")
    final = Trainer(cfg).train()
    assert main(["export", str(final), "--out", str(tmp_path / "merged"), "--merge"]) == 0

    run = load_trained(str(final))  # the adapter (EMA) onto its base
    export = load_trained(str(tmp_path / "merged"))
    base = load_pretrained(str(base_dir))
    base.backbone.inner.load_state_dict(merged_model(run.backbone.inner).state_dict())

    for sampler in SAMPLERS:
        assert _grid(run, sampler) == _grid(export, sampler) == _grid(base, sampler), sampler
    images = _images(run)
    assert torch.equal(images, _images(export))
    assert torch.equal(images, _images(base))
    assert not torch.equal(images, _images(load_pretrained(str(base_dir))))  # the run changed the model


def test_a_full_run_samples_on_the_grid_of_its_base_and_its_bank(tmp_path: Path) -> None:
    base_dir = _bare_model(tmp_path / "base")
    bank = tmp_path / "bank"
    cfg = make_cfg(base_dir, tmp_path / "run", bank)
    base = load_pretrained(str(base_dir))
    generate_bank(base, cfg.bank, progress=False)
    final = Trainer(cfg).train()
    trained, checkpoint = load_trained(str(final)), load_trained(str(final), use_ema=False)
    for sampler in {*SAMPLERS, cfg.bank.sampling.scheduler}:
        assert _grid(trained, sampler) == _grid(checkpoint, sampler) == _grid(base, sampler), sampler

    # the base model with the final weights draws the final model's images
    base.backbone.inner.load_state_dict(trained.backbone.inner.state_dict())
    assert torch.equal(_images(base), _images(trained))

    # the schedule difftune chose is recorded in every output
    manifest = json.loads((bank / "manifest.json").read_text())
    assert manifest["noise_schedule"] == DEFAULT_NOISE_SCHEDULE
    saved = json.loads((final / "scheduler" / SCHEDULER_FILE).read_text())
    assert {k: v for k, v in saved.items() if k != "_diffusers_version"} == DEFAULT_NOISE_SCHEDULE


def test_a_schedule_that_leaves_keys_to_the_sampler_is_written_back_leaving_them(tmp_path: Path) -> None:
    """An older pipeline's scheduler config that omits ``timestep_spacing`` lets each sampler use its
    own default; the run's ``final/`` must do the same, not state DDPM's default for it."""
    base_dir = tmp_path / "base"
    tiny_dit().save_pretrained(base_dir / "transformer")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(base_dir / "scheduler")
    path = base_dir / "scheduler" / SCHEDULER_FILE
    partial = {
        k: v for k, v in json.loads(path.read_text()).items() if k not in ("timestep_spacing", "steps_offset")
    }
    path.write_text(json.dumps(partial))

    final = Trainer(make_cfg(base_dir, tmp_path / "run", None)).train()
    base, trained = load_pretrained(str(base_dir)), load_trained(str(final))
    for sampler in SAMPLERS:
        assert _grid(trained, sampler) == _grid(base, sampler), sampler
    saved = json.loads((final / "scheduler" / SCHEDULER_FILE).read_text())
    assert "timestep_spacing" not in saved and saved["beta_schedule"] == partial["beta_schedule"]


def test_the_default_schedule_is_announced_once_with_a_relative_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_dir = _bare_model(tmp_path / "somewhere" / "base")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="difftune.backbones.noise_schedule"):
        for _ in range(3):
            load_pretrained(str(base_dir))
    warnings = [r.getMessage() for r in caplog.records if "no noise schedule" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(str(Path("somewhere") / "base") + " has no noise schedule")


def test_a_latent_dit_final_keeps_its_schedule_class_in_the_stock_pipeline(tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    tiny_dit(in_channels=4, sample_size=2).save_pretrained(base_dir / "transformer")
    tiny_vae().save_pretrained(base_dir / "vae")
    final = Trainer(
        make_cfg(base_dir, tmp_path / "run", None, "data.resolution=16", "train.max_steps=1")
    ).train()
    pipe = DiTPipeline.from_pretrained(str(final))
    assert type(pipe.scheduler).__name__ == DEFAULT_NOISE_SCHEDULE["_class_name"]
    assert pipe.scheduler.config.timestep_spacing == DEFAULT_NOISE_SCHEDULE["timestep_spacing"]


def test_a_run_folder_given_as_the_model_names_its_final(dit_dir: Path, tmp_path: Path, capsys) -> None:
    Trainer(make_cfg(dit_dir, tmp_path / "run", None, "train.max_steps=1")).train()
    assert (
        main(["sample", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "s"), "--steps", "2"]) == 2
    )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # after the training run's bars
        f"difftune: error: '{tmp_path / 'run'}' is a run's folder; give its model, {tmp_path / 'run' / 'final'}"
    )
    assert not (tmp_path / "s").exists()
