"""``eval fid --checkpoint`` and ``difftune forgetting`` on text-conditional models (Stable Diffusion and a
ControlNet), with a prompts file and control images, on the tiny pipelines of
:mod:`difftune.testing.models`; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftune.cli import main
from difftune.data.builtin import load_sklearn_digits
from difftune.metrics import save_classifier, train_digit_classifier
from difftune.testing.models import save_pipeline_dir, save_sd_pipeline, tiny_cond_unet, tiny_dit


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pipelines (SD, SD with another UNet, a ControlNet over the first SD's UNet, a DiT), a digit
    classifier, held-out images in two class folders, prompts files and a control image."""
    root = tmp_path_factory.mktemp("text")
    images, labels = load_sklearn_digits()
    heldout = root / "heldout"
    for k in (0, 1):
        (heldout / f"class{k}").mkdir(parents=True)
        for i, image in enumerate(images[labels == k][:4]):
            digit = Image.fromarray((image[0].numpy() * 255).astype(np.uint8))
            digit.convert("RGB").resize((32, 32)).save(heldout / f"class{k}" / f"{i}.png")
    classifier = root / "clf.safetensors"
    save_classifier(train_digit_classifier(images, labels, steps=30), classifier)
    control = root / "edges.png"
    edges = np.zeros((32, 32, 3), np.uint8)
    edges[8:24, 15:17] = 255
    Image.fromarray(edges).save(control)
    prompts = {}
    for name, lines in {"two": ["a zero", "a one"], "one": ["a digit"], "three": ["a", "b", "c"]}.items():
        prompts[f"prompts_{name}"] = root / f"{name}.txt"
        prompts[f"prompts_{name}"].write_text("\n".join(lines) + "\n")
    return {
        "sd": save_sd_pipeline(root / "sd"),
        "sd_other": save_sd_pipeline(root / "sd_other", unet=tiny_cond_unet(seed=3)),
        "cn": save_sd_pipeline(root / "cn", controlnet=True),
        "dit": save_pipeline_dir(root / "dit", tiny_dit(), "transformer"),
        "classifier": classifier,
        "heldout": heldout,
        "control": control,
        **prompts,
    }


def _png_array(folder: Path) -> np.ndarray:
    paths = sorted(p for p in folder.glob("0*.png"))
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


@pytest.mark.parametrize("model", ["sd", "cn"])
def test_eval_fid_samples_a_text_model_from_a_prompts_file_as_sample_does(
    files: dict[str, Path], model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    control = ["--control-image", str(files["control"])] if model == "cn" else []
    sampling = ["--steps", "2", "--seed", "3", "--guidance-scale", "2.0"]
    npz = tmp_path / "fake.npz"
    argv = ["eval", "fid", "--checkpoint", str(files[model]), "--real", str(files["heldout"])]
    argv += ["--prompts", str(files["prompts_two"]), *control, "--num-per-class", "2", *sampling]
    argv += ["--features", f"digits:{files['classifier']}", "--export-npz", str(npz)]
    assert main(argv) == 0
    fid = float(capsys.readouterr().out.split()[1])
    assert np.isfinite(fid) and fid > 0
    with np.load(npz) as data:
        generated = data["arr_0"]
    assert generated.shape == (4, 32, 32, 3)
    # the same images as `difftune sample` writes for the same prompts, seeds and control image
    folder = tmp_path / "sampled"
    sample = ["sample", "--model", str(files[model]), "--prompts-file", str(files["prompts_two"]), *control]
    assert main([*sample, "--per-label", "2", *sampling, "--out", str(folder)]) == 0
    np.testing.assert_array_equal(generated, _png_array(folder))
    # and the two prompts give different images: the prompts reach the model
    assert not np.array_equal(generated[:2], generated[2:])


def test_eval_fid_refuses_condition_flags_that_do_not_fit_in_one_line(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["eval", "fid", "--real", str(files["heldout"]), "--features", f"digits:{files['classifier']}"]
    cases = [
        (["--checkpoint", str(files["sd"])], "is not class-conditional: give --prompts"),
        (
            ["--checkpoint", str(files["dit"]), "--prompts", str(files["prompts_two"])],
            "takes class labels, not prompts",
        ),
        (["--checkpoint", str(files["cn"]), "--prompts", str(files["prompts_two"])], "needs --control-image"),
        (
            ["--checkpoint", str(files["sd"]), "--prompts", str(files["prompts_two"]), "--labels", "0"],
            "--labels (class-conditional models) and --prompts",
        ),
        (["--checkpoint", str(files["sd"]), "--control-image", str(files["control"])], "goes with --prompts"),
        (["--checkpoint", str(files["sd"]), "--prompts", str(tmp_path / "none.txt")], "--prompts '"),
        (
            ["--checkpoint", str(files["sd"]), "--prompts", str(files["prompts_two"])]
            + ["--control-image", str(files["control"])] * 3,
            "give one --control-image, or one per prompt (2); got 3",
        ),
        (
            ["--fake", str(files["heldout"]), "--prompts", str(files["prompts_two"])],
            "only apply with --checkpoint",
        ),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("difftune: error:") and message in err[0], (extra, err)


def _forgetting(files: dict[str, Path], finetuned: str, prompts: str, out: Path, *extra: str) -> int:
    return main(
        [
            "forgetting",
            "--finetuned",
            str(files[finetuned]),
            "--pretrained",
            str(files["sd"]),
            "--heldout",
            str(files["heldout"]),
            "--prompts",
            str(files[prompts]),
            "--features",
            f"digits:{files['classifier']}",
            "--num-per-class",
            "2",
            "--steps",
            "2",
            "--fractions",
            "0,0.5,1",
            "--gap-bins",
            "2",
            "--gap-draws",
            "1",
            "--batch-size",
            "4",
            "--out",
            str(out),
            *extra,
        ]
    )


def _rows(out: Path, name: str) -> list[dict[str, float]]:
    return json.loads((out / f"forgetting_{name}.json").read_text())["rows"]


def test_forgetting_probes_a_text_model_with_prompts(files: dict[str, Path], tmp_path: Path) -> None:
    assert _forgetting(files, "sd_other", "prompts_two", tmp_path / "two") == 0
    swap, gap = _rows(tmp_path / "two", "swap"), _rows(tmp_path / "two", "gap")
    assert [r["fraction"] for r in swap] == [0.0, 0.5, 1.0]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in swap)
    assert [(r["t_low"], r["t_high"]) for r in gap] == [(0, 499), (500, 999)]
    for r in gap:
        assert r["gap"] == pytest.approx(r["pretrained"] - r["finetuned"])
    assert (tmp_path / "two" / "forgetting_swap.png").is_file()

    # class c's held-out images are conditioned on prompt c: the same numbers as the probe's API given
    # those conditions by hand (the pre-trained model gets its unconditional form)
    from difftune.analysis.forgetting import transfer_gap
    from difftune.backbones import Conditioning, load_trained
    from difftune.backbones.stable_diffusion import PROMPTS
    from difftune.config.data import DataConfig
    from difftune.data.targets import load_target_images

    finetuned, pretrained = load_trained(str(files["sd_other"])), load_trained(str(files["sd"]))
    heldout = load_target_images(DataConfig(source="folder", path=str(files["heldout"])), 32, 3)
    x0 = torch.cat([finetuned.codec.encode(chunk)[0] for chunk in heldout.images.split(4)])
    prompts = finetuned.parts.prompts.encode(["a zero", "a one"])
    cond = Conditioning({PROMPTS: prompts[heldout.labels]})
    expected = transfer_gap(
        finetuned.backbone.eval(),
        pretrained.backbone.eval(),
        finetuned.scheduler_config,
        x0,
        cond,
        2,
        1,
        0,
        4,
    )
    assert [r["finetuned"] for r in gap] == pytest.approx([r["finetuned"] for r in expected], rel=1e-6)
    assert [r["pretrained"] for r in gap] == pytest.approx([r["pretrained"] for r in expected], rel=1e-6)

    # one prompt for every class: the pre-trained model's losses do not depend on the prompts, the
    # fine-tuned model's do
    assert _forgetting(files, "sd_other", "prompts_one", tmp_path / "one") == 0
    one = _rows(tmp_path / "one", "gap")
    assert [r["pretrained"] for r in one] == [r["pretrained"] for r in gap]
    assert [r["finetuned"] for r in one] != [r["finetuned"] for r in gap]


def test_forgetting_probes_a_controlnet_with_prompts_and_a_control_image(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cn"
    assert _forgetting(files, "cn", "prompts_two", out, "--control-image", str(files["control"])) == 0
    gap = _rows(out, "gap")
    assert _forgetting(files, "sd_other", "prompts_two", tmp_path / "sd") == 0
    # the same pre-trained model, data, t and noise: the same pre-trained losses whatever is fine-tuned
    assert [r["pretrained"] for r in gap] == [r["pretrained"] for r in _rows(tmp_path / "sd", "gap")]
    capsys.readouterr()
    assert _forgetting(files, "cn", "prompts_two", tmp_path / "x") == 2
    assert "a ControlNet needs --control-image" in capsys.readouterr().err
    assert _forgetting(files, "sd", "prompts_three", tmp_path / "x") == 2
    assert "--prompts gives 3 prompts for 2 held-out classes" in capsys.readouterr().err
    dit = ["forgetting", "--finetuned", str(files["dit"]), "--pretrained", str(files["dit"])]
    dit += [
        "--heldout",
        str(files["heldout"]),
        "--prompts",
        str(files["prompts_two"]),
        "--out",
        str(tmp_path / "d"),
    ]
    assert main(dit) == 2
    assert "takes class labels, not prompts" in capsys.readouterr().err
