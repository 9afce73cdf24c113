"""The Stable Diffusion 1.5 paper recipes (configs/paper/sd15_*.yaml): they load, they hold the numbers
configs/paper/README.md gives, each baseline differs from its Diff-Tuning recipe only in the objective
and the bank, and ``difftune bank`` / ``difftune train --dry-run`` accept them once the model and the
data are pointed at a tiny local SD pipeline and a tiny captioned folder (nothing is downloaded).

The four precomputed-condition recipes ship without a bank (``objective.retention_data: target``): a
ControlNet bank must hold control images made by the target's annotator, and precomputed control images
have none. Their documented bank variant (an annotator for the condition, ``data.control_column: null``)
is checked here with canny and with a user annotator given as ``module:function``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from difftune.cli import main
from difftune.config.experiment import load_config
from difftune.config.sections import flatten
from difftune.testing.models import save_sd_pipeline

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ANNOTATED = ["canny"]  # control images computed by a built-in annotator
PRECOMPUTED = ["sketch", "depth", "normal", "seg"]  # control images read from the data
CONDITIONS = ANNOTATED + PRECOMPUTED
CONTROLNET = [f"sd15_controlnet_{c}" for c in CONDITIONS]
NO_BANK = [f"sd15_controlnet_{c}" for c in PRECOMPUTED]  # Diff-Tuning with retention on the target data
# the documented bank variant of a NO_BANK recipe, with an annotator for its condition
BANK_VARIANT = ["objective.retention_data=bank", "data.control_column=null"]
DIFF_TUNING = [*CONTROLNET, "sd15_text_to_image"]
PLAIN = [f"{name}_plain" for name in DIFF_TUNING]
RIVAL = ["sd15_controlnet_canny_inverse_snr"]
RECIPES = DIFF_TUNING + PLAIN + RIVAL


def _recipe(name: str) -> Path:
    return PAPER / f"{name}.yaml"


def _is_controlnet(name: str) -> bool:
    return name.startswith("sd15_controlnet_")


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SD pipeline (32x32 images), a captioned folder with control images, and two tiny banks:
    one of a ControlNet (frozen SD samples with their Canny maps), one of SD text-to-image."""
    root = tmp_path_factory.mktemp("sd_recipes")
    model = save_sd_pipeline(root / "sd")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    (data / "conditions").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        for folder in ("images", "conditions"):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / folder / f"{i}.png")
        rows.append(
            {
                "file_name": f"images/{i}.png",
                "text": f"photo {i}",
                "conditioning_image": f"conditions/{i}.png",
            }
        )
    (data / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    paths = {"model": model, "data": data, "root": root}
    for key, name in (("controlnet_bank", "sd15_controlnet_canny"), ("t2i_bank", "sd15_text_to_image")):
        paths[key] = root / key
        code = main(["bank", "--config", str(_recipe(name)), *_tiny(paths, name), *_small_bank()])
        assert code == 0 and (paths[key] / "manifest.json").is_file(), name
    return paths


def _small_bank() -> list[str]:
    return ["--set", "bank.num_samples=2", "--set", "bank.sampling.steps=2"]


def _sets(*assignments: str) -> list[str]:
    """``--set`` arguments for each ``key=value``."""
    return [arg for assignment in assignments for arg in ("--set", assignment)]


def _tiny(paths: dict[str, Path], name: str, output: str = "run") -> list[str]:
    """Overrides that point a recipe at the tiny model, data, bank and a fresh output folder."""
    bank = paths["controlnet_bank"] if _is_controlnet(name) else paths["t2i_bank"]
    sets = {
        "model.pretrained": paths["model"],
        "data.path": paths["data"],
        "data.resolution": "null",  # the tiny model's own 32x32
        "bank.path": bank,
        "train.output_dir": paths["root"] / output / name,
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def test_every_sd_recipe_is_listed() -> None:
    assert {p.stem for p in PAPER.glob("sd15_*.yaml")} == set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_with_its_numbers(name: str) -> None:
    cfg = load_config(_recipe(name))
    assert cfg.model.pretrained == HUB_ID and cfg.tuning.method == "full"
    assert cfg.data.source == "captions" and cfg.data.caption_column == "text" and cfg.data.resolution == 512
    tc, oc = cfg.train, cfg.objective
    assert tc.batch_size == 32 and tc.mixed_precision == "bf16" and tc.learning_rate == pytest.approx(1e-5)
    assert tc.sample_every == 0  # a sample grid draws every distinct caption: not for a captioned set
    if _is_controlnet(name):
        assert cfg.model.controlnet == "from_unet" and oc.cfg_dropout == 0.5
        assert (tc.max_steps, tc.ema_decay, tc.weight_decay) == (10000, 0.0, 0.01)
        if "_canny" in name:  # condition fidelity (fidelity.jsonl) re-extracts the edges of generated images
            assert cfg.data.annotator == "canny" and cfg.data.control_column is None
            assert (tc.validation_every, tc.validation_samples, tc.sampling.guidance_scale) == (100, 16, 7.5)
        else:  # no annotator to re-extract the condition with
            assert cfg.data.annotator is None and cfg.data.control_column == "conditioning_image"
            assert tc.validation_every == 0
    else:
        assert cfg.model.controlnet is None and oc.cfg_dropout == 0.1
        assert (tc.max_steps, tc.ema_decay, tc.weight_decay) == (24000, 0.9999, 0.0)
        assert cfg.data.annotator is None and cfg.data.control_column is None
    if name in DIFF_TUNING:
        schedules = (
            oc.target_schedule,
            oc.bank_schedule,
            oc.power_up.exponent,
            oc.power_down.exponent,
            oc.realisation,
        )
        assert schedules == ("power_up", "power_down", 1.0, 1.0, "sample")
        assert cfg.bank_count == 6 and oc.bank_weight == 0.1
        # precomputed control images: retention on target images (no bank can match their annotator)
        assert oc.retention_data == ("target" if name in NO_BANK else "bank")
        assert cfg.uses_bank == (name not in NO_BANK)
        bank = cfg.bank  # kept, so that --set objective.retention_data=bank gives the bank variant
        assert (bank.num_samples, bank.sampling.guidance_scale, bank.sampling.steps) == (10000, 7.5, 25)
        assert bank.prompts == "captions" and bank.condition == "null" and bank.path.startswith("banks/sd15-")
    elif name in PLAIN:
        assert oc.target_schedule == "uniform" and cfg.bank_count == 0
    else:
        assert oc.target_schedule == "inverse_snr" and cfg.bank_count == 0


def _differences(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    """The ``section.key`` (``section.sub.key``) names whose values differ between two resolved configs."""
    flat_a, flat_b = flatten(a), flatten(b)
    return {key for key in flat_a.keys() | flat_b.keys() if flat_a.get(key) != flat_b.get(key)}


@pytest.mark.parametrize("name", DIFF_TUNING)
def test_baseline_differs_only_in_the_objective_and_the_bank(name: str) -> None:
    method = load_config(_recipe(name)).to_dict()
    plain = load_config(_recipe(f"{name}_plain")).to_dict()
    diff = _differences(method, plain) - {"train.output_dir"}
    # uniform t and no bank; every other objective setting (cfg dropout included) is the same
    expected = {"objective.target_schedule", "objective.bank_share"}
    if name in NO_BANK:  # the Diff-Tuning recipe retains on target data; the baseline has no retention
        expected.add("objective.retention_data")
    assert {key for key in diff if not key.startswith("bank.")} == expected


def test_rival_differs_from_the_baseline_only_in_the_target_weighting() -> None:
    plain = load_config(_recipe("sd15_controlnet_canny_plain")).to_dict()
    rival = load_config(_recipe("sd15_controlnet_canny_inverse_snr")).to_dict()
    assert _differences(plain, rival) == {"objective.target_schedule", "train.output_dir"}


@pytest.mark.parametrize("suffix", ["", "_plain"], ids=["difftune", "plain"])
def test_the_five_conditions_differ_only_in_their_data(suffix: str) -> None:
    configs = [load_config(_recipe(f"{name}{suffix}")).to_dict() for name in CONTROLNET]
    data_keys = {f"data.{key}" for key in configs[0]["data"]}
    validation = {"train.validation_every", "train.validation_samples", "train.sampling.guidance_scale"}
    retention = {"objective.retention_data"} if suffix == "" else set()  # canny's bank vs target data
    for other in configs[1:]:
        diff = _differences(configs[0], other)
        allowed = {"bank.path", "train.output_dir"} | data_keys | validation | retention
        assert "data.path" in diff and diff <= allowed
        assert ("bank.path" in diff) == (suffix == "")  # each condition has its own bank


@pytest.mark.parametrize("name", RECIPES)
def test_dry_run_accepts_the_recipe(
    name: str, sd: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["train", "--config", str(_recipe(name)), "--dry-run", *_tiny(sd, name)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "", captured.err
    out = captured.out
    assert "the target has 4 captioned images" in out
    if _is_controlnet(name):
        assert "ControlNetModel, samples (4, 4, 4), conditioned on prompt_embeds, control" in out
        if "_canny" in name:
            assert "control    computed by {'name': 'canny', 'low': 100, 'high': 200}" in out
        else:
            assert "control    images from the data's column 'conditioning_image'" in out
    else:
        assert "UNet2DConditionModel, samples (4, 4, 4), conditioned on prompt_embeds;" in out
    if name in NO_BANK:  # as shipped: retention on the target's images, no bank read
        assert "batch      32 = 26 target + 6 retention (target data) (x" in out and "bank       " not in out
    elif name in DIFF_TUNING:
        assert "batch      32 = 26 target + 6 bank (x" in out and "bank       2 samples from" in out
    else:
        assert "batch      32 = 32 target + 0 bank (x" in out and "bank       " not in out
    assert not (sd["root"] / "run" / name).exists()  # a dry run writes nothing


@pytest.mark.parametrize("condition", PRECOMPUTED)
def test_bank_of_a_precomputed_condition_needs_an_annotator(
    condition: str, sd: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # as configs/paper/README.md says: the bank's control images must be computed from its samples
    name = f"sd15_controlnet_{condition}"
    sets = [*_tiny(sd, name), "--set", f"bank.path={sd['root'] / 'refused' / condition}", *_small_bank()]
    capsys.readouterr()
    assert main(["bank", "--config", str(_recipe(name)), *sets]) == 2
    assert "set data.annotator" in capsys.readouterr().err
    assert not (sd["root"] / "refused" / condition / "manifest.json").exists()


@pytest.mark.parametrize("condition", PRECOMPUTED)
def test_bank_of_another_annotator_is_refused(
    condition: str, sd: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # the canny bank's control images cannot stand in for precomputed depth maps (or sketches, ...)
    name = f"sd15_controlnet_{condition}"
    args = ["train", "--config", str(_recipe(name)), "--dry-run", *_tiny(sd, name)]
    capsys.readouterr()
    assert main([*args, *_sets("objective.retention_data=bank")]) == 2
    assert "must use the target's annotator" in capsys.readouterr().err


def test_bank_of_a_precomputed_condition_with_the_documented_override(
    sd: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # canny stands in for the condition's own annotator, which difftune does not have
    name = "sd15_controlnet_depth"
    bank = sd["root"] / "override_bank"
    sets = [*_tiny(sd, name), *_sets(f"bank.path={bank}", *BANK_VARIANT, "data.annotator=canny")]
    assert main(["bank", "--config", str(_recipe(name)), *sets, *_small_bank()]) == 0
    manifest = json.loads((bank / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and manifest["num_prompts"] == 4  # prompts: the 4 captions
    assert manifest["annotator"] == {"name": "canny", "low": 100, "high": 200}
    capsys.readouterr()
    assert main(["train", "--config", str(_recipe(name)), "--dry-run", *sets]) == 0
    out = capsys.readouterr().out
    assert "batch      32 = 26 target + 6 bank (x" in out and "bank       2 samples from" in out


ANNOTATOR_MODULE = """
import torch


def annotate(images: torch.Tensor) -> torch.Tensor:
    # images (N, C, H, W) in [-1, 1] -> control images (N, 3, H, W) in [0, 1]
    return ((images[:, :1].repeat(1, 3, 1, 1) + 1) / 2).clamp(0, 1)
"""


def test_bank_with_a_user_annotator(
    sd: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # data.annotator as "module:function": the user's annotator makes the bank's and the target's controls
    (tmp_path / "mymod.py").write_text(ANNOTATOR_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "sd15_controlnet_depth"
    bank = tmp_path / "bank"
    sets = [*_tiny(sd, name), *_sets(f"bank.path={bank}", *BANK_VARIANT, "data.annotator=mymod:annotate")]
    assert main(["bank", "--config", str(_recipe(name)), *sets, *_small_bank()]) == 0
    manifest = json.loads((bank / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and manifest["annotator"] == {"name": "mymod:annotate"}
    capsys.readouterr()
    assert main(["train", "--config", str(_recipe(name)), "--dry-run", *sets]) == 0
    captured = capsys.readouterr()
    assert captured.err == "", captured.err
    assert "control    computed by {'name': 'mymod:annotate'}" in captured.out
    assert (
        "batch      32 = 26 target + 6 bank (x" in captured.out
        and "bank       2 samples from" in captured.out
    )
    # the same bank with another annotator's target controls is refused
    assert (
        main(["train", "--config", str(_recipe(name)), "--dry-run", *sets, *_sets("data.annotator=canny")])
        == 2
    )
    assert "must use the target's annotator" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sd15_controlnet_canny_plain", "sd15_text_to_image_plain"])
def test_dry_run_with_the_hub_id_as_shipped(
    name: str, sd: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # the hub model is read from the local cache only: absent, it is reported as not checked
    sets = _tiny(sd, name)
    at = sets.index(f"model.pretrained={sd['model']}")
    del sets[at - 1 : at + 1]
    capsys.readouterr()
    assert main(["train", "--config", str(_recipe(name)), "--dry-run", *sets]) == 0
    assert f"model      {HUB_ID}, full tuning" in capsys.readouterr().out
