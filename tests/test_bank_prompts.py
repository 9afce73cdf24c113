"""``bank.prompts``: the prompts each mode (captions, empty, file, class_swap) gives a text-conditional
model's bank, the refusals of settings a mode does not read, the old spelling (a prompt file's path, or
null) upgraded with its deprecation line, and a bank that refuses to resume with other prompts.

Nothing is downloaded: the Stable Diffusion pipeline is tiny and built from configs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from difftune.backbones import load_pretrained
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.backbones.text import prompts_digest
from difftune.bank import bank_manifest, load_bank
from difftune.bank.conditions import prepare_bank_conditions
from difftune.bank.prompts import bank_prompts
from difftune.cli import main
from difftune.config.experiment import ConfigError, ExperimentConfig, config_from_dict, load_config
from difftune.errors import UserError
from difftune.io.store import LatentStore
from difftune.testing.models import save_sd_pipeline

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "a photo of sks dog",
    "Sks  Dog on the beach",  # another case, two spaces
    "a sketch of sksdog",  # not a whole word: kept
    "a photo of a cat",  # no instance: kept
    "the sks toy",
]
SWAPPED = ["a photo of dog", "dog on the beach", "a sketch of sksdog", "a photo of a cat", "the sks toy"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of five 32x32 images with a metadata.jsonl of :data:`CAPTIONS`."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    root.mkdir()
    for i in range(len(CAPTIONS)):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(root / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": text} for i, text in enumerate(CAPTIONS)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def _raw(data: Path, model: str = "x/y", **bank: Any) -> dict[str, Any]:
    return {
        "model": {"pretrained": model},
        "data": {"source": "captions", "path": str(data)},
        "bank": {"num_samples": 2, "batch_size": 2, "sampling": {"steps": 1}, **bank},
        "objective": {"bank_share": 0},
    }


def _config(data: Path, **bank: Any) -> ExperimentConfig:
    return config_from_dict(_raw(data, **bank))


def _file(path: Path, *lines: str) -> str:
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "difftune.config.renames"]
    caplog.clear()
    return lines


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("difftune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------ what each mode yields


def test_each_mode_yields_its_prompts(shapes: Path, tmp_path: Path) -> None:
    assert bank_prompts(_config(shapes)) == CAPTIONS  # the default: the target set's captions
    assert bank_prompts(_config(shapes, prompts="empty")) == [""]
    prompts = _file(tmp_path / "p.txt", "a red bird", "", "  a blue fish  ")
    assert bank_prompts(_config(shapes, prompts="file", prompts_file=prompts)) == [
        "a red bird",
        "a blue fish",
    ]
    swap = {"instance": "sks dog", "class_word": "dog"}
    assert bank_prompts(_config(shapes, prompts="class_swap", class_swap=swap)) == SWAPPED


def test_the_readme_example_swaps_the_captions(shapes: Path) -> None:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(bank:\n  prompts: class_swap\n.*?)\n```", text, re.S)
    assert block is not None
    assert bank_prompts(_config(shapes, **yaml.safe_load(block.group(1))["bank"])) == SWAPPED


def test_class_swap_takes_several_phrases_the_longer_first(shapes: Path) -> None:
    swap = {"instance": ["sks", "sks dog"], "class_word": "dog"}  # "sks dog" is not left as "dog dog"
    prompts = bank_prompts(_config(shapes, prompts="class_swap", class_swap=swap))
    assert prompts == [*SWAPPED[:4], "the dog toy"]


def test_class_swap_of_a_phrase_no_caption_holds_is_refused(shapes: Path) -> None:
    cfg = _config(shapes, prompts="class_swap", class_swap={"instance": "zwx cat", "class_word": "cat"})
    with pytest.raises(UserError) as info:
        bank_prompts(cfg)
    assert str(info.value) == (
        "bank.class_swap.instance='zwx cat' is in none of the target set's 5 captions (e.g. 'a photo of sks "
        "dog'); give the token or phrase the captions use"
    )


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (None, "bank.prompts_file '{path}' does not exist; give a text file with one prompt per line"),
        (["", "  "], "bank.prompts_file '{path}' holds no prompts; write one prompt per line"),
    ],
    ids=["missing", "blank"],
)
def test_a_missing_or_blank_prompt_file_is_refused(
    lines: list[str] | None, message: str, shapes: Path, tmp_path: Path
) -> None:
    path = tmp_path / "p.txt"
    if lines is not None:
        _file(path, *lines)
    with pytest.raises(UserError) as info:
        bank_prompts(_config(shapes, prompts="file", prompts_file=str(path)))
    assert str(info.value) == message.format(path=path)


# ------------------------------------------------------------------------- settings a mode does not read


@pytest.mark.parametrize(
    ("bank", "message"),
    [
        (
            {"prompts": "file"},
            "bank.prompts=file reads bank.prompts_file, which is empty: give a text file with one prompt per line",
        ),
        (
            {"prompts_file": "p.txt"},
            "bank.prompts_file='p.txt' is read only by bank.prompts=file, but bank.prompts=captions: set "
            "bank.prompts=file, or remove bank.prompts_file",
        ),
        (
            {"prompts": "empty", "class_swap": {"instance": "sks dog"}},
            "bank.class_swap.instance='sks dog' is read only by bank.prompts=class_swap, but bank.prompts=empty: "
            "set bank.prompts=class_swap, or remove bank.class_swap",
        ),
        (
            {"prompts": "class_swap", "class_swap": {"instance": "sks dog"}},
            "bank.prompts=class_swap replaces bank.class_swap.instance by bank.class_swap.class_word in each "
            "caption: set both (e.g. class_swap: {instance: sks dog, class_word: dog})",
        ),
        (
            {"prompts": "class_swap", "class_swap": {"instance": ["sks", " "], "class_word": "dog"}},
            "bank.class_swap.instance=['sks', ' ']: give a phrase such as 'sks dog', or a list of non-empty phrases",
        ),
        (
            {"prompts": "caption"},
            "bank.prompts='caption': use one of ['captions', 'empty', 'file', 'class_swap']",
        ),
    ],
)
def test_a_setting_the_mode_does_not_read_is_refused_in_one_line(
    bank: dict[str, Any], message: str, shapes: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        _config(shapes, **bank)
    assert str(info.value) == message


def test_a_class_conditional_model_refuses_a_prompt_mode(
    dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _raw(tmp_path, str(dit_dir), prompts="empty", path=str(tmp_path / "bank"))
    raw["data"] = {"source": "digits", "classes": [1, 2]}
    raw["train"] = {"output_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    expected = (
        f"bank.prompts=empty chooses a text-conditional model's bank prompts, but {dit_dir} is conditioned on "
        "labels (its bank takes no prompts); remove bank.prompts"
    )
    for command in ("bank", "train"):  # found from the model's config, before any weights are read
        assert main([command, "--config", str(tmp_path / "c.yaml"), "--dry-run"]) == 2
        assert _error_line(capsys) == f"difftune: error: {expected}"


# --------------------------------------------------------------------------------- the old spelling


def test_the_old_spelling_is_upgraded_with_one_deprecation_line(
    shapes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = _file(tmp_path / "p.txt", "a red bird")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(_raw(shapes, prompts=prompts)))
    with caplog.at_level("WARNING"):
        old = load_config(tmp_path / "old.yaml")
        assert _said(caplog) == [
            f"bank.prompts={prompts} is deprecated: use bank.prompts=file and bank.prompts_file={prompts}"
        ]
        by_set = load_config(None, [*_sets(shapes), f"bank.prompts={prompts}"]).bank
        assert (by_set.prompts, by_set.prompts_file) == ("file", prompts)
        assert len(_said(caplog)) == 1  # --set takes it too
        assert load_config(None, [*_sets(shapes), "bank.prompts=null"]).bank.prompts == "captions"
        assert _said(caplog) == ["bank.prompts=null is deprecated: use bank.prompts=captions"]
    assert (old.bank.prompts, old.bank.prompts_file) == ("file", prompts)
    assert bank_prompts(old) == ["a red bird"]
    both = _raw(shapes, prompts=prompts, prompts_file=prompts)
    with pytest.raises(ConfigError) as info:
        config_from_dict(both)
    assert str(info.value) == (
        f"bank.prompts={prompts} is the old spelling of bank.prompts_file, which is given too; keep "
        "bank.prompts_file only"
    )


def _sets(data: Path) -> list[str]:
    return ["model.pretrained=x/y", "data.source=captions", f"data.path={data}", "objective.bank_share=0"]


# ------------------------------------------------------------------------------ the bank's manifest


def test_a_bank_records_its_prompt_mode_and_refuses_to_resume_with_another(
    sd_dir: Path, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bank = tmp_path / "bank"
    swap = {"instance": "sks dog", "class_word": "dog"}
    configs = {name: tmp_path / f"{name}.yaml" for name in ("swap", "puppy", "captions")}
    for name, values in {
        "swap": {"prompts": "class_swap", "class_swap": swap},
        "puppy": {"prompts": "class_swap", "class_swap": {**swap, "class_word": "puppy"}},
        "captions": {},
    }.items():
        configs[name].write_text(yaml.safe_dump(_raw(shapes, str(sd_dir), path=str(bank), **values)))
    line = "prompts: the target set's 5 captions, 2 with 'sks dog' replaced by 'dog' (3 without it kept as they are)"
    assert main(["bank", "--config", str(configs["swap"]), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == line
    assert main(["bank", "--config", str(configs["swap"])]) == 0
    assert line in capsys.readouterr().out.splitlines()
    manifest = json.loads((bank / "manifest.json").read_text())
    assert (manifest["prompts"], manifest["class_swap"]) == (
        "class_swap",
        {"instance": ["sks dog"], "class_word": "dog"},
    )
    assert (manifest["num_prompts"], manifest["prompts_sha256"]) == (5, prompts_digest(SWAPPED))
    loaded = load_pretrained(str(sd_dir))
    expected = loaded.parts.prompts.encode(SWAPPED[:2]).half()  # sample i: swapped caption i mod 5
    assert torch.equal(load_bank(bank, loaded)[PROMPTS], expected)
    recorded = "{'class_word': 'dog', 'instance': ['sks dog']}"
    for name, now in (("puppy", "{'instance': ['sks dog'], 'class_word': 'puppy'}"), ("captions", "None")):
        assert main(["bank", "--config", str(configs[name])]) == 2
        assert _error_line(capsys) == (
            f"difftune: error: {bank} already holds samples made with other settings (class_swap: {recorded} "
            f"there vs {now} now); use another path or delete it"
        )
    # a bank made before its manifest recorded the mode resumes with the same prompts, and only with them
    del manifest["prompts"], manifest["class_swap"]
    (bank / "manifest.json").write_text(json.dumps(manifest))
    assert main(["bank", "--config", str(configs["swap"])]) == 0
    capsys.readouterr()
    assert main(["bank", "--config", str(configs["captions"])]) == 2
    assert f"(prompts_sha256: '{prompts_digest(SWAPPED)}' there vs '{prompts_digest(CAPTIONS)}' now)" in (
        _error_line(capsys)
    )


def test_the_mode_alone_tells_two_banks_of_the_same_prompts_apart(
    sd_dir: Path, shapes: Path, tmp_path: Path
) -> None:
    loaded = load_pretrained(str(sd_dir))
    same = _file(tmp_path / "p.txt", *CAPTIONS)  # the captions, as a file: the same prompts, another mode
    manifests = {}
    for mode, bank, line in (
        ("file", {"prompts": "file", "prompts_file": same}, f"5 prompts of {same}"),
        ("captions", {}, "the target set's 5 captions"),
    ):
        cfg = _config(shapes, path=str(tmp_path / "bank"), **bank)
        assert prepare_bank_conditions(loaded, cfg) == line
        manifests[mode] = bank_manifest(loaded, cfg.bank)
    assert manifests["file"] == {**manifests["captions"], "prompts": "file"}
    LatentStore.create(tmp_path / "bank", manifests["file"])
    with pytest.raises(UserError, match=r"\(prompts: 'file' there vs 'captions' now\)"):
        LatentStore.create(tmp_path / "bank", manifests["captions"])
