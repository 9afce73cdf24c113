"""The contract table: every model family on every forward process, end to end through the CLI.

Each cell writes a tiny random-init base model whose scheduler is the process's training scheduler,
then runs ``difftune bank`` -> ``difftune train`` (Diff-Tuning: both streams) -> ``difftune sample``
and checks what each step promises: the bank records the model's process and the sampler that ran,
training moves the weights and keeps the losses finite, ``final/`` names the process's scheduler
class, and the samples are finite images. A family or process that misses a hook fails here, in
its own cell, not in a user's run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from difftune.cli import main
from difftune.process import DEFAULT_SAMPLERS, SCHEDULER_CLASSES
from difftune.process.schedulers import make_scheduler
from difftune.testing.models import save_sd_pipeline, save_sdxl_pipeline, tiny_dit, tiny_unet
from difftune.testing.sd3 import save_sd3_pipeline
from test_training import changed, metrics, weights

PROCESSES = ("ddpm", "flow", "edm")
FAMILIES = ("dit", "unet", "text", "sdxl", "sd3", "controlnet")
TEXT = ("text", "sdxl", "sd3", "controlnet")  # the families conditioned on prompts
SCHEDULER_SETTINGS = {"ddpm": {}, "flow": {"shift": 3.0}, "edm": {}}
MODEL_FOLDER = {
    "dit": "transformer",
    "unet": "unet",
    "text": "unet",
    "sdxl": "unet",
    "sd3": "transformer",
    "controlnet": "controlnet",
}


def _base(family: str, process: str, root: Path) -> Path:
    """A tiny base model of ``family`` whose scheduler/ is ``process``'s training scheduler."""
    if family == "sdxl":
        save_sdxl_pipeline(root)
    elif family == "sd3":
        save_sd3_pipeline(root)
    elif family in ("text", "controlnet"):
        save_sd_pipeline(root)
    else:
        model = tiny_dit(learn_sigma=process == "ddpm") if family == "dit" else tiny_unet()
        model.save_pretrained(root / MODEL_FOLDER[family])
    make_scheduler(process, **SCHEDULER_SETTINGS[process]).save_pretrained(root / "scheduler")
    return root


def _captions(root: Path, n: int = 6) -> Path:
    """``n`` 32x32 outline drawings with a metadata.jsonl of captions."""
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        img = Image.new("RGB", (32, 32), "black")
        shape, colour = ("circle", "red") if i % 2 else ("square", "blue")
        box = (4 + i, 5, 25, 26 - i % 3)
        (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(
            box, outline=colour, width=3
        )
        img.save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {colour} {shape}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _config(family: str, base: Path, tmp: Path) -> Path:
    if family in TEXT:
        data = {"source": "captions", "path": str(_captions(tmp / "captions"))}
    else:
        data = {"source": "digits", "classes": [5, 6], "per_class": 4}
    model: dict = {"pretrained": str(base)}
    if family == "controlnet":
        model["controlnet"] = "from_unet"
        data["annotator"] = "canny"
    raw = {
        "model": model,
        "data": data,
        "bank": {"path": str(tmp / "bank"), "num_samples": 4, "sampling": {"steps": 2}, "batch_size": 4},
        "objective": {"bank_share": 0.25},
        "train": {
            "output_dir": str(tmp / "run"),
            "batch_size": 4,
            "max_steps": 2,
            "checkpoint_every": 1,
            "keep_checkpoints": 2,
            "log_every": 1,
            "learning_rate": 1e-3,
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_on_process_bank_train_sample(family: str, process: str, tmp_path: Path) -> None:
    base = _base(family, process, tmp_path / "base")
    config = _config(family, base, tmp_path)

    assert main(["bank", "--config", str(config)]) == 0
    manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert manifest["num_samples"] == 4
    assert manifest["scheduler"] == DEFAULT_SAMPLERS[process]  # the sampler that ran (the default, mapped)
    assert manifest["noise_schedule"]["_class_name"] in SCHEDULER_CLASSES[process]

    assert main(["train", "--config", str(config)]) == 0
    run, final = tmp_path / "run", tmp_path / "run" / "final"
    history = metrics(run)
    assert [row["step"] for row in history] == [1, 2]
    assert all(np.isfinite(row["loss/total"]) and row["loss/bank"] > 0 for row in history)  # both streams
    first = run / "checkpoints" / "checkpoint-0000001" / "model"
    assert (
        changed(weights(final, MODEL_FOLDER[family]), weights(first, MODEL_FOLDER[family])) > 0
    )  # it trains
    saved_scheduler = json.loads((final / "scheduler" / "scheduler_config.json").read_text())
    assert saved_scheduler["_class_name"] in SCHEDULER_CLASSES[process]

    args = ["sample", "--model", str(final), "--per-label", "1", "--steps", "2", "--out", str(tmp_path / "s")]
    if family in TEXT:
        args += ["--prompt", "a red circle"]
    else:
        args += ["--labels", "0"]
    if family == "controlnet":
        args += ["--control-image", str(tmp_path / "captions" / "0.png")]
    assert main(args) == 0
    images = sorted((tmp_path / "s").glob("*.png"))
    assert images
    pixels = np.asarray(Image.open(images[0]))
    assert pixels.ndim in (2, 3) and np.isfinite(pixels).all()


TUNING_METHODS = ("full", "lora", "loha", "lokr", "bitfit", "difffit", "adaptformer", "vpt", "svdiff")
# what a family refuses, by design, with one line that says why (everything else must train)
REFUSED = {("controlnet", m) for m in TUNING_METHODS if m != "full"}  # a new ControlNet is not reproducible
REFUSED |= {
    ("unet", "vpt"),
    ("unet", "adaptformer"),
}  # a class-conditional UNet2DModel has no transformer blocks
REFUSED |= {("sd3", "vpt")}  # SD3's joint blocks are not the BasicTransformerBlocks VPT prompts


@pytest.mark.parametrize("method", TUNING_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_tuning_method_on_family(family: str, method: str, tmp_path: Path, capsys) -> None:
    base = _base(family, "ddpm", tmp_path / "base")
    config = _config(family, base, tmp_path)
    overrides = [
        "--set",
        f"tuning.method={method}",
        "--set",
        "objective.bank_share=0",
        "--set",
        "train.max_steps=2",
    ]
    code = main(["train", "--config", str(config), *overrides])
    if (family, method) in REFUSED:
        assert code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("difftune: error")]
        assert len(errors) == 1 and "tuning.method" in errors[0]  # one line naming the setting to change
        return
    assert code == 0
    run = tmp_path / "run"
    first, final = run / "checkpoints" / "checkpoint-0000001" / "model", run / "final"
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["tuning"] == method and summary["trainable_parameters"] > 0
    if method == "full":
        assert changed(weights(final, MODEL_FOLDER[family]), weights(first, MODEL_FOLDER[family])) > 0
    else:  # an adapter run saves its adapter beside the merged weights, and the adapter trains
        assert summary["trainable_share"] < 1


@pytest.mark.parametrize("objective", ("diff_tuning", "distillation"))
@pytest.mark.parametrize("family", FAMILIES)
def test_objective_on_family_on_flow(family: str, objective: str, tmp_path: Path) -> None:
    base = _base(family, "flow", tmp_path / "base")
    config = _config(family, base, tmp_path)
    assert main(["bank", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config), "--set", f"objective.kind={objective}"]) == 0
    history = metrics(tmp_path / "run")
    assert all(np.isfinite(row["loss/total"]) for row in history)
    if objective == "distillation":  # the retention stream regresses on the frozen model's predictions
        assert all(row["loss/bank"] >= 0 for row in history)


@pytest.fixture(scope="module")
def digit_probe_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Held-out digits of classes 0 and 1 (one folder per class) and a small digit classifier's features."""
    from difftune.data.builtin import load_sklearn_digits
    from difftune.metrics import save_classifier, train_digit_classifier

    root = tmp_path_factory.mktemp("probe")
    images, labels = load_sklearn_digits()
    for k in (0, 1):
        (root / "heldout" / f"class{k}").mkdir(parents=True)
        for i, image in enumerate(images[labels == k][:6]):
            pixels = (image[0].numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "heldout" / f"class{k}" / f"{i}.png")
    save_classifier(train_digit_classifier(images, labels, steps=30), root / "clf.safetensors")
    return {"heldout": root / "heldout", "features": root / "clf.safetensors"}


@pytest.mark.parametrize("process", PROCESSES)
def test_evaluation_commands_on_process(
    process: str, digit_probe_inputs: dict[str, Path], tmp_path: Path
) -> None:
    """``forgetting`` (swap probe and transfer gap), ``eval fid --checkpoint`` and domain guidance on every process."""
    family = "unet" if process == "edm" else "dit"
    pretrained = _base(family, process, tmp_path / "pre")
    config = _config(family, pretrained, tmp_path)
    far = ["--set", "objective.bank_share=0", "--set", "train.learning_rate=0.05"]  # a model unlike its base
    assert main(["train", "--config", str(config), *far]) == 0
    finetuned, features = tmp_path / "run" / "final", f"digits:{digit_probe_inputs['features']}"
    common = ["--num-per-class", "2", "--steps", "2", "--features", features]

    out = tmp_path / "forgetting"
    probe = ["forgetting", "--finetuned", str(finetuned), "--pretrained", str(pretrained)]
    probe += ["--heldout", str(digit_probe_inputs["heldout"]), "--fractions", "0,1", "--gap-bins", "2"]
    assert main([*probe, "--gap-draws", "1", "--out", str(out), *common]) == 0
    gap = json.loads((out / "forgetting_gap.json").read_text())
    assert len(gap["rows"]) == 2 and all(
        r["gap"] == pytest.approx(r["pretrained"] - r["finetuned"]) for r in gap["rows"]
    )
    swap = json.loads((out / "forgetting_swap.json").read_text())
    assert [r["fraction"] for r in swap["rows"]] == [0.0, 1.0] and all(r["fid"] >= 0 for r in swap["rows"])

    report = tmp_path / "fid.json"
    fid = ["eval", "fid", "--real", str(digit_probe_inputs["heldout"]), "--checkpoint", str(finetuned)]
    assert main([*fid, *common, "--out-json", str(report)]) == 0
    assert json.loads(report.read_text())["fid"] >= 0

    sample = ["sample", "--model", str(finetuned), "--labels", "0", "--per-label", "1", "--steps", "10"]
    sample += ["--guidance-scale", "2"]
    assert main([*sample, "--domain-guidance", str(pretrained), "--out", str(tmp_path / "guided")]) == 0
    assert main([*sample, "--out", str(tmp_path / "plain")]) == 0
    guided, plain = (
        np.asarray(Image.open(tmp_path / d / "00000_label0_seed0.png")) for d in ("guided", "plain")
    )
    assert guided.shape == plain.shape and not np.array_equal(guided, plain)  # the guide's branch is used
