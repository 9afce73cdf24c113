"""The SDXL, SD3.5 and Flux.1 recipes (configs/recipes/): each Diff-Tuning recipe has a ``_plain`` twin that differs
only in the objective and the bank, the memory each quotes is what its dry run estimates for the published
model (``benchmarks/recipe_memory.py``, on the meta device: nothing downloaded), and each passes
``--dry-run`` (bank and train) on a tiny pipeline of its family.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from difftune.cli import main
from difftune.config.experiment import load_config
from difftune.config.sections import flatten
from difftune.testing.flux import save_flux_pipeline
from difftune.testing.models import save_sdxl_pipeline
from difftune.testing.sd3 import save_sd3_pipeline

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import recipe_memory  # noqa: E402

NAMES = ("sdxl_lora", "sdxl_full", "sd35_medium_lora", "sd35_medium_full", "flux1_dev_lora", "flux1_dev_full")
BUILDERS = {"sdxl": save_sdxl_pipeline, "sd35": save_sd3_pipeline, "flux1": save_flux_pipeline}


def _recipe(name: str) -> Path:
    return ROOT / "configs" / "recipes" / f"{name}.yaml"


def test_every_recipe_has_a_plain_twin() -> None:
    recipes = {p.stem for p in (ROOT / "configs" / "recipes").glob("*.yaml")}
    assert set(NAMES) <= recipes
    assert {f"{name}_plain" for name in recipes if not name.endswith("_plain")} <= recipes


@pytest.mark.parametrize("name", NAMES)
def test_the_plain_twin_differs_only_in_the_objective_and_the_bank(name: str) -> None:
    method, plain = (flatten(load_config(_recipe(n)).to_dict()) for n in (name, f"{name}_plain"))
    differ = {key for key in method.keys() | plain.keys() if method.get(key) != plain.get(key)}
    assert {key for key in differ if not key.startswith("bank.")} == {
        "objective.target_schedule",
        "objective.bank_share",
        "train.output_dir",
    }
    assert (
        method["objective.target_schedule"] == "power_up" and plain["objective.target_schedule"] == "uniform"
    )
    assert plain["objective.bank_share"] == 0.0 < method["objective.bank_share"]


@pytest.mark.parametrize("name", NAMES)
def test_a_recipe_runs_in_bf16_with_checkpointing_and_lora_keeps_its_base_in_bf16(name: str) -> None:
    cfg = load_config(_recipe(name))
    assert cfg.train.mixed_precision == "bf16" and cfg.train.gradient_checkpointing
    assert cfg.tuning.method == ("lora" if name.endswith("_lora") else "full")
    assert cfg.train.frozen_dtype == ("bfloat16" if name.endswith("_lora") else "float32")


def test_the_quoted_memory_is_the_estimate_for_the_published_model(tmp_path: Path) -> None:
    folders: dict[str, Path] = {}
    for name in recipe_memory.RECIPES:
        recipe = ROOT / recipe_memory.RECIPES[name]
        pretrained = load_config(recipe).model.pretrained
        if pretrained not in folders:  # also checks the published parameter count
            folders[pretrained] = recipe_memory.write_config_folder(tmp_path, pretrained)
        estimate = recipe_memory.estimate(recipe, folders[pretrained])
        assert estimate.activations is not None, name
        assert recipe_memory.quoted(recipe) == round(estimate.total / recipe_memory.GIB, 2), name


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    return {family: build(root / family) for family, build in BUILDERS.items()}


@pytest.mark.parametrize("name", [f"{n}{twin}" for n in NAMES for twin in ("", "_plain")])
def test_the_dry_run_accepts_the_recipe_on_a_tiny_pipeline(
    name: str, pipelines: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32)).save(data / "0.png")
    (data / "metadata.jsonl").write_text(
        json.dumps({"file_name": "0.png", "text": "a photo of sks dog"}) + "\n"
    )
    model = pipelines[name.split("_")[0]]
    sets = {"model.pretrained": model, "data.path": data, "data.resolution": 32}
    sets |= {"bank.path": tmp_path / "bank", "train.output_dir": tmp_path / "run"}
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    raw = yaml.safe_load(_recipe(name).read_text())
    if "bank" in raw:
        assert main(["bank", "--config", str(_recipe(name)), "--dry-run", *args]) == 0
        out = capsys.readouterr().out
        if raw["bank"].get("prompts") == "class_swap":
            assert "with 'sks dog' replaced by 'dog'" in out
        args += ["--set", "objective.bank_share=0"]  # no bank was written
    assert main(["train", "--config", str(_recipe(name)), "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert f"{raw['tuning']['method'] if 'tuning' in raw else 'full'} tuning" in out
    assert "precision bf16" in out and "memory     about" in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "bank").exists()
