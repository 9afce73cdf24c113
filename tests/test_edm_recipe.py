"""The paper's EDM recipes (configs/paper/edm_imagenet64_cifar10{,_plain}.yaml), validated on a tiny EDM
model: they load, a dry run passes, the baseline trains with EDM's own σ density and the Diff-Tuning
recipe with the ported ψ/ξ, and each runs a few steps end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from difftune.cli import main
from difftune.config.experiment import load_config
from difftune.objectives import build_objective
from difftune.process import build_process
from difftune.process.schedulers import make_scheduler
from difftune.testing.models import tiny_unet

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
RECIPES = ("edm_imagenet64_cifar10.yaml", "edm_imagenet64_cifar10_plain.yaml")


@pytest.fixture(scope="module")
def tiny_edm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-conditional RGB UNet2DModel (3 classes + the null row) with an EDM scheduler."""
    root = tmp_path_factory.mktemp("edm") / "model"
    tiny_unet(in_channels=3, num_classes=3).save_pretrained(root / "unet")
    make_scheduler("edm").save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of 3 classes, 4 random 8x8 RGB images each."""
    root = tmp_path_factory.mktemp("cifar") / "train"
    g = torch.Generator().manual_seed(0)
    for name in ("airplane", "bird", "cat"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _sets(model: Path, data: Path, out: Path) -> list[str]:
    sets = {
        "model.pretrained": model,
        "data.path": data,
        "data.resolution": 8,
        "bank.path": out / "bank",
        "train.output_dir": out / "run",
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def test_the_recipes_differ_only_in_the_objective_and_the_bank() -> None:
    full, plain = (load_config(PAPER / name) for name in RECIPES)
    assert full.model == plain.model and full.data == plain.data and full.tuning == plain.tuning
    assert {k: v for k, v in vars(full.train).items() if k != "output_dir"} == {
        k: v for k, v in vars(plain.train).items() if k != "output_dir"
    }
    oc = full.objective
    assert (oc.target_schedule, oc.bank_schedule, oc.power.axis) == ("power_up", "power_down", "auto")
    assert (oc.power_up.exponent, oc.power_down.exponent, oc.bank_weight, oc.bank_share) == (
        1.0,
        1.0,
        0.1,
        0.2,
    )
    assert full.bank.condition == "own" and oc.cfg_dropout == 0.0  # an EDM model has no null label to train
    assert plain.bank_count == 0 and plain.objective.target_schedule == "pretraining"


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_recipe_dry_runs_on_a_tiny_edm_model(
    recipe: str, tiny_edm: Path, cifar_like: Path, tmp_path: Path, capsys
) -> None:
    sets = _sets(tiny_edm, cifar_like, tmp_path)
    small_bank = ["--set", "bank.num_samples=4", "--set", "bank.sampling.steps=2"]
    if recipe == RECIPES[0]:  # the dry run checks the bank against the model
        assert main(["bank", "--config", str(PAPER / recipe), *sets, *small_bank]) == 0
    assert main(["train", "--config", str(PAPER / recipe), "--dry-run", *sets]) == 0
    assert "target" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_the_baseline_draws_sigma_from_edms_own_density(
    tiny_edm: Path, cifar_like: Path, tmp_path: Path
) -> None:
    cfg = load_config(PAPER / RECIPES[1], _sets(tiny_edm, cifar_like, tmp_path)[1::2])
    process = build_process(json.loads((tiny_edm / "scheduler" / "scheduler_config.json").read_text()))
    from difftune.backbones import load_pretrained

    objective = build_objective(cfg.objective, process, load_pretrained(str(tiny_edm)).backbone)
    own = process.pretraining_density()
    torch.testing.assert_close(objective.schedules[0].probs(), own / own.sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_recipe_trains_a_tiny_edm_model(
    recipe: str, tiny_edm: Path, cifar_like: Path, tmp_path: Path
) -> None:
    short = ["--set", "train.max_steps=2", "--set", "train.batch_size=5", "--set", "train.checkpoint_every=0"]
    short += [
        "--set",
        "train.log_every=1",
        "--set",
        "train.sample_every=0",
        "--set",
        "bank.num_samples=4",
        "--set",
        "bank.sampling.steps=2",
    ]
    sets = _sets(tiny_edm, cifar_like, tmp_path) + short
    if recipe == RECIPES[0]:
        assert main(["bank", "--config", str(PAPER / recipe), *sets]) == 0
    assert main(["train", "--config", str(PAPER / recipe), *sets]) == 0
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(row["loss/total"])) for row in history)
    saved = json.loads((tmp_path / "run" / "final" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "EDMEulerScheduler"
