"""ControlNets over SDXL and SD3 end to end through the CLI, on tiny random-init pipelines.

Nothing is downloaded (:mod:`difftune.testing.controlnet`). For each of SDXL (``ControlNetModel`` with
``text_time``) and SD3 (``SD3ControlNetModel``): a new ControlNet from the base model's weights, a bank of
the frozen model's samples with control images extracted from them by the annotator, a Diff-Tuning run
resumed exactly, ``sample --prompt --control-image``, and the stock ControlNet pipeline on ``final/``
reproducing difftune's sample. The recipes pass ``--dry-run`` on the tiny pipelines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from difftune.backbones import FAMILIES, load_pretrained, load_trained
from difftune.backbones.controlnet import CONTROL
from difftune.backbones.controlnet_sd3 import SD3ControlNetBackbone
from difftune.backbones.controlnet_sdxl import SDXLControlNetBackbone
from difftune.backbones.families import family_for_config
from difftune.bank import load_bank
from difftune.cli import main
from difftune.control import build_annotator
from difftune.errors import UserError
from difftune.testing.controlnet import save_sd3_controlnet_pipeline, save_sdxl_controlnet_pipeline
from test_sdxl import _files, _write
from test_sdxl import _raw as _xl_raw

ROOT = Path(__file__).parents[1]


@dataclass(frozen=True)
class Case:
    """One ControlNet family: its tiny pipeline, classes and stock pipeline."""

    name: str
    build: Any
    family: str
    adapter: type
    frozen: str  # the frozen model's sub-folder
    pipeline: str
    scheduler: str
    recipe: str
    image_arg: str  # the stock pipeline's control image argument


CASES = {
    "sdxl": Case(
        "sdxl",
        save_sdxl_controlnet_pipeline,
        "sdxl_controlnet",
        SDXLControlNetBackbone,
        "unet",
        "StableDiffusionXLControlNetPipeline",
        "EulerDiscreteScheduler",
        "sdxl_controlnet_canny",
        "image",
    ),
    "sd3": Case(
        "sd3",
        save_sd3_controlnet_pipeline,
        "sd3_controlnet",
        SD3ControlNetBackbone,
        "transformer",
        "StableDiffusion3ControlNetPipeline",
        "FlowMatchEulerDiscreteScheduler",
        "sd35_medium_controlnet_canny",
        "control_image",
    ),
}


def _raw(base: Path, captions: Path, out: Path) -> dict:
    """The SDXL tests' run (:func:`test_sdxl._raw`) of a new ControlNet on Canny edges, its fidelity measured."""
    validation = {"validation_every": 4, "validation_samples": 2, "sampling": {"steps": 2}}
    raw = _xl_raw(base, captions, out, model={"controlnet": "from_unet"}, data={"annotator": "canny"})
    return {**raw, "train": {**raw["train"], **validation}}


@pytest.fixture(scope="module", params=list(CASES))
def run(request: pytest.FixtureRequest, captions: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """bank -> a 4-step Diff-Tuning run of a new ControlNet, and the same cut at step 2 and resumed."""
    case = CASES[request.param]
    out = tmp_path_factory.mktemp(case.name)
    base = case.build(out / "base")
    raw = _raw(base, captions, out)
    config = _write(raw, out / "config.yaml")
    assert main(["bank", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config)]) == 0
    parts = {**raw, "train": {**raw["train"], "output_dir": str(out / "parts")}}
    parts_config = _write(parts, out / "parts.yaml")
    assert main(["train", "--config", str(parts_config), "--set", "train.max_steps=2"]) == 0
    assert main(["train", "--config", str(parts_config), "--set", "train.resume=latest"]) == 0
    return {"case": case, "out": out, "base": base}


def test_the_bank_holds_the_frozen_models_samples_with_their_control_images(run: dict) -> None:
    case, out = run["case"], run["out"]
    loaded = load_pretrained(str(run["base"]), controlnet="from_unet")
    assert type(loaded.backbone) is case.adapter
    bank = load_bank(str(out / "bank"), loaded)
    edges = build_annotator("canny")(loaded.codec.decode(bank["samples"]))
    assert bank[CONTROL].dtype == torch.uint8 and bank[CONTROL].shape == (4, 3, 32, 32)
    assert torch.equal(bank[CONTROL], (edges * 255).round().to(torch.uint8))
    manifest = json.loads((out / "bank" / "manifest.json").read_text())
    assert manifest["annotator"] == {"name": "canny", "low": 100, "high": 200}
    assert manifest["conditions"][-1] == CONTROL
    # the bank is the frozen base model's: the plain model reads it too (same fingerprint)
    assert load_bank(str(out / "bank"), load_pretrained(str(run["base"])))["samples"].shape[0] == 4


def test_the_run_resumes_exactly_and_reloads_over_its_frozen_base(run: dict) -> None:
    case, out = run["case"], run["out"]
    whole, resumed = out / "run" / "final", out / "parts" / "final"
    for sub in ("controlnet", "ema/controlnet"):
        a, b = _files(whole / sub), _files(resumed / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    source = json.loads((whole / "difftune_source.json").read_text())
    assert source["unet"] == [str(run["base"].resolve()), case.frozen]
    trained = load_trained(str(whole), use_ema=False)
    assert trained.family is FAMILIES[case.family] and type(trained.backbone) is case.adapter
    config = json.loads((whole / "controlnet" / "config.json").read_text())
    assert family_for_config(config) is FAMILIES[case.family]
    base = load_pretrained(str(run["base"]))
    frozen = trained.backbone.source_model.state_dict()
    assert all(torch.equal(frozen[k], v) for k, v in base.backbone.inner.state_dict().items())
    new = load_pretrained(str(run["base"]), controlnet="from_unet").backbone.inner.state_dict()
    assert any(not torch.equal(new[k], v) for k, v in trained.backbone.inner.state_dict().items())
    fidelity = [json.loads(line) for line in (out / "run" / "fidelity.jsonl").read_text().splitlines()]
    assert [row["step"] for row in fidelity] == [0, 4]


def sample_with_control(final: Path, control: Path, out: Path, *sampling: str) -> np.ndarray:
    """``difftune sample`` of "a red circle" from ``final``'s trained weights with ``control``: the image, int16."""
    args = ["sample", "--model", str(final), "--no-ema", "--prompt", "a red circle", "--control-image"]
    assert main([*args, str(control), "--per-label", "1", "--steps", "2", *sampling, "--out", str(out)]) == 0
    return np.asarray(Image.open(out / "00000_prompt0_seed0.png"), dtype=np.int16)


def assert_stock_pipeline_agrees(
    ours: np.ndarray, pipe: Any, image_arg: str, captions: Path, **call: Any
) -> None:
    """The stock ControlNet ``pipe`` (2 steps at 32 px, seed 0, ``call``) gives ``ours`` within 1/255 from the
    same control image (captions/0.png), and another sample from another one (the control steers it)."""

    def stock(control: Path) -> np.ndarray:
        image = Image.open(control).convert("RGB")
        out = pipe(
            "a red circle",
            **{image_arg: image},
            height=32,
            width=32,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **call,
        ).images[0]
        return (out * 255).round().astype(np.int16)

    theirs = stock(captions / "0.png")
    assert np.abs(ours - theirs).max() <= 1, np.abs(ours - theirs).max()
    assert np.abs(ours - stock(captions / "3.png")).max() > 1  # the control image steers the sample


def assert_sampling_needs_a_control_image(final: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["sample", "--model", str(final), "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "s")]
    assert main(args) == 2
    assert "needs --control-image" in capsys.readouterr().err


def test_the_stock_controlnet_pipeline_reproduces_difftunes_sample(
    run: dict, captions: Path, tmp_path: Path
) -> None:
    import diffusers

    case, final = run["case"], run["out"] / "run" / "final"
    sampling = ("--guidance-scale", "3", "--scheduler", case.scheduler)
    ours = sample_with_control(final, captions / "0.png", tmp_path / "s", *sampling)
    pipe = getattr(diffusers, case.pipeline).from_pretrained(str(final))
    assert type(pipe.scheduler).__name__ == case.scheduler
    assert_stock_pipeline_agrees(ours, pipe, case.image_arg, captions, guidance_scale=3.0)


def test_sampling_a_controlnet_needs_a_control_image(run: dict, tmp_path: Path, capsys) -> None:
    assert_sampling_needs_a_control_image(run["out"] / "run" / "final", tmp_path, capsys)


def test_a_new_controlnet_trains_in_full_and_an_existing_one_may_take_lora(
    run: dict, captions: Path, tmp_path: Path, capsys
) -> None:
    case = run["case"]
    raw = _raw(run["base"], captions, tmp_path)
    raw["tuning"] = {"method": "lora"}
    assert main(["train", "--config", str(_write(raw, tmp_path / "new.yaml")), "--dry-run"]) == 2
    assert "train it in full" in capsys.readouterr().err
    existing = case.build(tmp_path / "existing", seed=1, controlnet=True)
    raw = _raw(existing, captions, tmp_path)
    raw["model"]["controlnet"] = str(existing / "controlnet")
    raw["tuning"] = {"method": "lora", "lora": {"rank": 4, "alpha": 16.0}}
    raw["objective"]["bank_share"] = 0.0
    raw["train"].update(max_steps=2, checkpoint_every=0, validation_every=0, ema_decay=0.0)
    assert main(["train", "--config", str(_write(raw, tmp_path / "lora.yaml"))]) == 0
    final = tmp_path / "run" / "final"
    trained = load_trained(str(final)).backbone.eval()
    start = load_pretrained(str(existing), controlnet=str(existing / "controlnet")).backbone.eval()
    assert type(trained) is case.adapter
    cond = start.unconditional(2)
    cond = type(cond)({**cond, CONTROL: torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)})
    x, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    from difftune.tuning import adapters_off

    with torch.no_grad():
        assert not torch.allclose(trained(x, t, cond), start(x, t, cond))  # the adapter is on
        with adapters_off(trained):
            torch.testing.assert_close(trained(x, t, cond), start(x, t, cond))  # over exactly that base


def test_a_controlnet_of_another_base_is_refused(run: dict, tmp_path: Path) -> None:
    other = "sd3" if run["case"].name == "sdxl" else "sdxl"
    foreign = CASES[other].build(tmp_path / "other", controlnet=True)
    with pytest.raises(UserError, match="SD3ControlNetModel|does not fit"):
        load_pretrained(str(run["base"]), controlnet=str(foreign / "controlnet"))


@pytest.mark.parametrize("twin", ["", "_plain"])
@pytest.mark.parametrize("name", list(CASES))
def test_the_recipe_passes_the_dry_run_on_a_tiny_pipeline(
    name: str, twin: str, captions: Path, tmp_path: Path, capsys
) -> None:
    case = CASES[name]
    recipe = ROOT / "configs" / "recipes" / f"{case.recipe}{twin}.yaml"
    base = case.build(tmp_path / "base")
    sets = {"model.pretrained": base, "data.path": captions, "data.resolution": 32}
    sets |= {"bank.path": tmp_path / "bank", "train.output_dir": tmp_path / "run"}
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    raw = yaml.safe_load(recipe.read_text())
    if "bank" in raw:
        assert main(["bank", "--config", str(recipe), "--dry-run", *args]) == 0
        args += ["--set", "objective.bank_share=0"]  # no bank was written
    capsys.readouterr()
    assert main(["train", "--config", str(recipe), "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert "control    computed by {'name': 'canny', 'low': 100, 'high': 200}" in out
    assert "conditioned on" in out and "control" in out and "memory     about" in out
    assert "activations not estimated" not in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "bank").exists()


@pytest.mark.parametrize("name", list(CASES))
def test_the_plain_twin_differs_only_in_the_objective_and_the_bank(name: str) -> None:
    from difftune.config.experiment import load_config
    from difftune.config.sections import flatten

    recipe = ROOT / "configs" / "recipes" / CASES[name].recipe
    method, plain = (flatten(load_config(f"{recipe}{twin}.yaml").to_dict()) for twin in ("", "_plain"))
    differ = {key for key in method.keys() | plain.keys() if method.get(key) != plain.get(key)}
    assert {key for key in differ if not key.startswith("bank.")} == {
        "objective.target_schedule",
        "objective.bank_share",
        "train.output_dir",
    }
    assert method["model.controlnet"] == "from_unet" and method["data.annotator"] == "canny"
    assert method["train.validation_every"] > 0 and method["train.ema_decay"] == 0.0


def test_sd3_encodes_a_control_tensor_once_and_again_when_it_changes(tmp_path: Path) -> None:
    base = save_sd3_controlnet_pipeline(tmp_path / "base", controlnet=True)
    backbone = load_pretrained(str(base), controlnet=str(base / "controlnet")).backbone.eval()
    calls = []
    encode = backbone.vae.encode
    backbone.vae.encode = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    cond = backbone.unconditional(2)  # black control images
    x, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        first, again = backbone(x, t, cond), backbone(x, t, cond)  # as sampling steps call it
        assert calls == [2] and torch.equal(first, again)
        cond[CONTROL].fill_(255)  # changed in place: encoded again
        assert not torch.equal(backbone(x, t, cond), first) and calls == [2, 2]


def test_a_controlnet_over_a_folder_that_holds_its_own_is_refused(tmp_path: Path) -> None:
    """A ControlNet pipeline's (or a ControlNet run's) controlnet/ is found first, so model.controlnet
    would be ignored: refused in one line, and the base's sub-folder named explicitly works."""
    from difftune.backbones.loading import peek_backbone
    from difftune.testing.models import save_sd_pipeline

    pipe = save_sd_pipeline(tmp_path / "cn", controlnet=True)
    message = (
        r"holds a ControlNet of its own \(controlnet/\), which would be trained instead of model.controlnet"
    )
    for load in (peek_backbone, load_pretrained):
        with pytest.raises(UserError, match=message):
            load(str(pipe), controlnet="from_unet")
    assert (
        type(peek_backbone(str(pipe), subfolder="unet", controlnet="from_unet")).__name__
        == "ControlNetBackbone"
    )
