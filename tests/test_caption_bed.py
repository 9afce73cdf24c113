"""The text-to-image test bed: its data split and folders, the banks each method reads, and the scores
of a tiny end-to-end run (the study itself is scripts/caption_study.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from difftune.bank.prompts import bank_prompts
from difftune.cli import main
from difftune.data.builtin import PHOTOS
from difftune.demos.caption_bed import CaptionBedSettings, method_config, run_caption_bed
from difftune.demos.caption_data import (
    PHOTO_CAPTION,
    DigitSplit,
    photo_name,
    rotated,
    write_source_data,
    write_target_pool,
)


def test_split_is_a_fixed_partition_of_the_digits() -> None:
    split, again = DigitSplit.load(), DigitSplit.load()
    parts = torch.cat([split.source, split.pool, split.held_out])
    assert sorted(parts.tolist()) == list(range(len(split.labels)))
    assert torch.equal(split.pool, again.pool) and torch.equal(split.held_out, again.held_out)
    assert len(split.source) == round(0.5 * len(split.labels))


def test_rotation_turns_a_quarter_anticlockwise() -> None:
    image = torch.zeros(1, 8, 8)
    image[0, 0, 7] = 1.0  # top right
    assert rotated(image)[0, 0, 0] == 1.0  # top left


def test_folders_hold_captioned_source_and_rotated_pool(tmp_path: Path) -> None:
    split = DigitSplit.load()
    source = write_source_data(tmp_path, split, patches_per_photo=3, seed=0)
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines()]
    digits = [r for r in rows if r["text"].startswith("digit ")]
    assert len(digits) == len(split.source)
    assert {r["text"] for r in rows if not r["text"].startswith("digit ")} >= {PHOTO_CAPTION.format("moon")}
    assert (
        photo_name(next(i for i, (_, name) in enumerate(PHOTOS) if "hubble" in name)) == "hubble deep field"
    )
    pool = write_target_pool(tmp_path, split)
    assert sorted(p.name for p in pool.iterdir()) == [str(k) for k in range(10)]
    first = split.pool[0].item()
    written = Image.open(pool / str(int(split.labels[first])) / f"{first:04d}.png")
    expected = (rotated(split.images[first])[0] * 255).round()
    assert torch.equal(
        torch.as_tensor(list(written.convert("L").getdata()), dtype=torch.float32).view(8, 8), expected
    )
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def _tiny(tmp_path: Path) -> CaptionBedSettings:
    return CaptionBedSettings(
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        patches_per_photo=3,
        pretrain_steps=20,
        pretrain_batch=16,
        per_class=2,
        bank_samples=20,
        finetune_steps=6,
        finetune_batch=8,
        eval_per_class=3,
        sample_steps=3,
        classifier_steps=20,
        ema_decay=0.0,  # so that six steps move the scored model
    )


def test_methods_read_the_banks_their_prompts_name(tmp_path: Path) -> None:
    s = _tiny(tmp_path)
    configs = {name: method_config(s, name, tmp_path, tmp_path / "pool", tmp_path) for name in s.methods}
    assert configs["plain"].objective.bank_share == 0
    captions, swapped = configs["diff-tuning"], configs["diff-tuning class_swap"]
    assert captions.bank.prompts == "captions" and swapped.bank.prompts == "class_swap"
    assert swapped.bank.path == configs["prior preservation"].bank.path != captions.bank.path
    assert configs["prior preservation"].objective.target_schedule == "uniform"
    assert configs["prior preservation"].objective.bank_schedule == "uniform"
    assert swapped.data.caption_template.format(3) == "sks digit 3"
    split = DigitSplit.load()
    write_target_pool(tmp_path, split)
    swapped.data.path = str(tmp_path / "target_pool")
    assert sorted(set(bank_prompts(swapped))) == [f"digit {k}" for k in range(10)]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_run_scores_every_method(tmp_path: Path) -> None:
    s = _tiny(tmp_path)
    results = run_caption_bed(s)
    assert list(results) == ["pre-trained (no tuning)", *s.methods]
    anchor = results["pre-trained (no tuning)"]
    assert anchor["forgetting"] == pytest.approx(0.0, abs=1e-6)  # the source against its own samples
    for name in s.methods:
        assert all(math.isfinite(v) and v >= 0 for v in results[name].values())
        assert results[name]["forgetting"] > 1e-3  # fine-tuning moved the model
        assert (s.out / f"samples_{name.replace(' ', '_')}.png").is_file()
    assert json.loads((s.out / "results.json").read_text()) == results
    info = json.loads((s.out / "run_info.json").read_text())
    assert "torch" in json.dumps(info["environment"])


def test_the_cli_runs_it_as_a_demo(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "captions", "--dry-run", "--cache-dir", str(tmp_path)]) == 0
    plan = capsys.readouterr().out
    assert "sks digit 3" in plan and "demo_captions_out" in plan
    assert f"caption-bed-source-{CaptionBedSettings().source_key()}" in plan
    assert main(["demo", "captions", "--process", "edm"]) != 0
    assert (
        "the captions demo's model is fixed (a rectified-flow text-to-image UNet)" in capsys.readouterr().err
    )


def test_a_study_runs_each_seed_once_and_collects_the_finished(tmp_path: Path) -> None:
    from difftune.demos.seeds import run_seeds
    from difftune.errors import UserError

    ran: list[int] = []

    def run(out: Path, seed: int) -> None:
        ran.append(seed)
        if seed != 2:  # seed 2 stops before writing its results
            out.mkdir(parents=True)
            (out / "results.json").write_text(json.dumps({"seed": seed}))

    with pytest.raises(UserError, match="no finished seeds"):
        run_seeds(tmp_path, [0, 1], run, collect_only=True)
    assert run_seeds(tmp_path, [0, 1, 2], run) == {0: {"seed": 0}, 1: {"seed": 1}}
    assert run_seeds(tmp_path, [0, 1, 3], run) == {0: {"seed": 0}, 1: {"seed": 1}, 3: {"seed": 3}}
    assert ran == [0, 1, 2, 3]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_method_added_later_runs_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The earlier methods' scores are kept when the frozen model scores the same; a changed setting runs all."""
    from difftune.demos import caption_bed

    s = _tiny(tmp_path)
    s.methods = {"plain": s.methods["plain"]}
    first = run_caption_bed(s)
    trained: list[str] = []
    original = caption_bed.method_config

    def recording(settings, name, *args):  # noqa: ANN001, ANN202
        trained.append(name)
        return original(settings, name, *args)

    monkeypatch.setattr(caption_bed, "method_config", recording)
    s.methods = {**s.methods, "prior preservation": CaptionBedSettings().methods["prior preservation"]}
    second = run_caption_bed(s)
    assert trained == ["prior preservation"] and second["plain"] == first["plain"]
    assert second["pre-trained (no tuning)"] == first["pre-trained (no tuning)"]
    s.finetune_steps = 5  # another setting: nothing earlier is kept
    run_caption_bed(s)
    assert trained == ["prior preservation", "plain", "prior preservation"]
