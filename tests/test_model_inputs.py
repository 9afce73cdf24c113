"""Model paths and sampling inputs are checked before anything is loaded, and refused in one line.

A typo in any model path (config keys and command-line flags) is refused at once, not looked up on
the hub; a tokenizer that does not fit its text encoder, an empty prompts file and flags that exclude
each other (or that the model cannot take) are refused in one line each.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from difftune.cli import main
from difftune.config.checks import check_model_paths
from difftune.config.experiment import ModelConfig
from difftune.testing.models import save_sd_pipeline, tiny_text_encoder


def _error_line(capsys: pytest.CaptureFixture) -> str:
    """The one ``difftune: error:`` line of the command, with no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("difftune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _train_config(tmp_path: Path, model: dict[str, str]) -> Path:
    cfg = {
        "model": model,
        "data": {"source": "digits", "classes": [5, 6], "per_class": 2},
        "objective": {"bank_share": 0.0},
        "bank": {"path": str(tmp_path / "bank")},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion pipeline (no ControlNet)."""
    return save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture
def edges(tmp_path: Path) -> Path:
    path = tmp_path / "edges.png"
    Image.new("RGB", (32, 32)).save(path)
    return path


@pytest.mark.parametrize("command", ["train", "bank"])
@pytest.mark.parametrize("key", ["vae", "controlnet"])
def test_a_typo_in_a_config_model_path_is_refused_before_anything_loads(
    command: str,
    key: str,
    dit_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for typo in (str(tmp_path / "no-such-model"), "./no-such-model", "runs/no-such-model"):
        config = _train_config(tmp_path, {"pretrained": str(dit_dir), key: typo})
        assert main([command, "--config", str(config), "--dry-run"]) == 2
        line = _error_line(capsys)
        assert f"model.{key} '{typo}' does not exist" in line, line


def test_model_paths_leave_hub_ids_and_a_new_controlnet_alone(dit_dir: Path) -> None:
    check_model_paths(ModelConfig(pretrained=str(dit_dir), vae="owner/vae", controlnet="owner/controlnet"))
    check_model_paths(ModelConfig(pretrained=str(dit_dir), controlnet="from_unet"))
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained 'owner/name/extra' does not exist"):
        check_model_paths(ModelConfig(pretrained="owner/name/extra"))


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--model", "{typo}"],
        ["sample", "--model", "{dit}", "--vae", "{typo}"],
        ["sample", "--model", "{dit}", "--domain-guidance", "{typo}", "--guidance-scale", "2"],
        ["eval", "fid", "--real", "digits", "--checkpoint", "{typo}"],
        ["eval", "fid", "--real", "digits", "--checkpoint", "{dit}", "--vae", "{typo}"],
        ["forgetting", "--finetuned", "{typo}", "--pretrained", "{dit}", "--heldout", "{held}"],
        ["forgetting", "--finetuned", "{dit}", "--pretrained", "{typo}", "--heldout", "{held}"],
        [
            "forgetting",
            "--finetuned",
            "{dit}",
            "--pretrained",
            "{dit}",
            "--heldout",
            "{held}",
            "--vae",
            "{typo}",
        ],
    ],
)
def test_a_typo_in_a_model_flag_is_refused_in_one_line_naming_the_flag(
    argv: list[str], dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "held" / "a").mkdir(parents=True)
    typo = str(tmp_path / "no-such-model")
    argv = [arg.format(typo=typo, dit=dit_dir, held=tmp_path / "held") for arg in argv]
    flag = argv[argv.index(typo) - 1]
    assert main([*argv, "--dry-run"]) == 2
    line = _error_line(capsys)
    assert f"{flag} '{typo}' does not exist" in line, line


def test_a_typo_in_the_model_to_export_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["export", str(tmp_path / "no-such-run"), "--out", str(tmp_path / "out")]) == 2
    assert "no-such-run is not a directory" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def _swap_text_part(sd_dir: Path, tmp_path: Path, part: str) -> Path:
    """A copy of ``sd_dir`` whose tokenizer (or text encoder) does not fit the other."""
    import shutil

    from transformers import CLIPTextModel

    pipe = tmp_path / "sd"
    shutil.copytree(sd_dir, pipe)
    shutil.rmtree(pipe / part)
    if part == "tokenizer":  # prompts of 32 tokens for an encoder of 16 positions
        tiny_text_encoder(max_length=32)[1].save_pretrained(pipe / "tokenizer")
    else:  # an encoder of 20 token ids for a tokenizer of 86
        config = tiny_text_encoder()[0].config
        config.vocab_size = 20
        CLIPTextModel(config).save_pretrained(pipe / "text_encoder")
    return pipe


@pytest.mark.parametrize(
    "part, sizes",
    [
        ("tokenizer", r"prompts of 32 tokens .* 16 positions \(max_position_embeddings\)"),
        ("text_encoder", r"tokenizer has 86 tokens but the text encoder only 20 \(vocab_size\)"),
    ],
)
def test_a_tokenizer_that_does_not_fit_its_text_encoder_is_refused_in_one_line(
    part: str, sizes: str, sd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pipe = _swap_text_part(sd_dir, tmp_path, part)
    argv = ["sample", "--model", str(pipe), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert str(pipe) in line and "tokenizer/ and text_encoder/ of one pipeline" in line, line
    assert re.search(sizes, line), line
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_an_empty_prompts_file_is_refused_as_empty(
    text: str, dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)
    assert main(["sample", "--model", str(dit_dir), "--prompts-file", str(prompts), "--dry-run"]) == 2
    line = _error_line(capsys)
    assert "prompts.txt' holds no prompts" in line and "one prompt per line" in line, line


@pytest.mark.parametrize("prompt_flag", ["--prompt", "--prompts-file"])
def test_prompts_with_labels_are_refused_before_the_model_is_read(
    prompt_flag: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    value = "x" if prompt_flag == "--prompt" else str(prompts)
    # the model does not exist: the flags are refused before it is even looked for
    argv = ["sample", "--model", str(tmp_path / "model"), prompt_flag, value, "--labels", "0", "--dry-run"]
    assert main(argv) == 2
    assert "--labels (class-conditional models) and --prompt/--prompts-file" in _error_line(capsys)


def test_a_control_image_without_a_controlnet_is_refused_before_loading(
    sd_dir: Path,
    dit_dir: Path,
    edges: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import difftune.backbones

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(difftune.backbones, "load_trained", no_loading)
    out = tmp_path / "s"
    argv = [
        "sample",
        "--model",
        str(sd_dir),
        "--prompt",
        "x",
        "--control-image",
        str(edges),
        "--out",
        str(out),
    ]
    for dry_run in ([], ["--dry-run"]):
        assert main([*argv, *dry_run]) == 2
        line = _error_line(capsys)
        assert f"{sd_dir} has no ControlNet, so --control-image would be ignored" in line, line
    # on a class-conditional model it goes without prompts: refused as such, before the model is read
    assert main(["sample", "--model", str(dit_dir), "--control-image", str(edges), "--out", str(out)]) == 2
    assert "--control-image goes with --prompt or --prompts-file" in _error_line(capsys)
    # prompts for a class-conditional model are found from its config too
    assert main(["sample", "--model", str(dit_dir), "--prompt", "x", "--out", str(out)]) == 2
    assert "takes class labels, not prompts" in _error_line(capsys)
    assert not out.exists()


def test_a_trailing_slash_is_a_local_path_not_a_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from difftune.config.checks import check_model_path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model 'no-such-model/' does not exist"):
        check_model_path("no-such-model/")
    check_model_path("owner/name")  # may be a hub id: left to the hub
