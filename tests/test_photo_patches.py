"""The second test bed's source domain: patches of the photographs bundled with scikit-image and scikit-learn."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from difftune.cli import main
from difftune.config.experiment import DataConfig
from difftune.data.builtin import PATCH_SCALES, PHOTOS, load_photo_patches
from difftune.data.targets import load_target_images
from difftune.demos.digits import run_demo
from difftune.demos.report import STUDY_FINDINGS
from difftune.demos.settings import PHOTO_TEST_BED, SOURCE_DATA, DemoSettings
from difftune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_patches_cover_every_photo_at_every_scale_in_the_unit_range() -> None:
    images, labels = load_photo_patches(size=8, per_photo=6, seed=0)
    assert images.shape == (6 * len(PHOTOS), 1, 8, 8)
    assert images.dtype == torch.float32 and images.min() >= 0.0 and images.max() <= 1.0
    assert torch.equal(labels, torch.arange(len(PHOTOS)).repeat_interleave(6))
    # real photographs, not blank: patches differ from one another and most have texture
    assert images.flatten(1).std(dim=1).gt(0.0).float().mean() > 0.5
    assert len({tuple(x.flatten().tolist()) for x in images}) == images.shape[0]


def test_patches_are_reproducible_and_follow_the_seed() -> None:
    a, _ = load_photo_patches(size=8, per_photo=len(PATCH_SCALES), seed=3)
    b, _ = load_photo_patches(size=8, per_photo=len(PATCH_SCALES), seed=3)
    c, _ = load_photo_patches(size=8, per_photo=len(PATCH_SCALES), seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_patch_size_follows_the_model() -> None:
    images, _ = load_photo_patches(size=16, per_photo=3, seed=0)
    assert images.shape[1:] == (1, 16, 16)


def test_too_few_patches_per_photo_is_refused() -> None:
    with pytest.raises(UserError, match="at least 3 patches per photo"):
        load_photo_patches(size=8, per_photo=2)


def test_photo_patches_as_training_data_keep_the_chosen_photos() -> None:
    data = load_target_images(DataConfig(source="photo_patches", classes=[2, 0], per_class=3, seed=1), 8, 3)
    assert data.class_names == [PHOTOS[0][1].split("/")[-1].split(".")[0], "camera"]
    assert torch.equal(data.labels, torch.tensor([0, 0, 0, 1, 1, 1]))
    images = data.loader(torch.arange(6))
    assert images.shape == (6, 3, 8, 8) and images.min() >= -1.0 and images.max() <= 1.0
    # the grayscale patch is copied to every channel, and equals the patch cut directly
    patches, labels = load_photo_patches(8, 3, 1)
    assert torch.equal(images[:, 0], images[:, 2])
    assert torch.allclose(images[:3, 0], patches[labels == 0][:, 0] * 2 - 1)
    other = load_target_images(DataConfig(source="photo_patches", classes=[2, 0], per_class=3, seed=2), 8, 3)
    assert other.identity != data.identity  # the target cache is keyed by the patch draw


def test_demo_source_data_is_checked_and_the_digits_source_keeps_its_cache_key() -> None:
    with pytest.raises(UserError, match="source_data='faces' is unknown"):
        DemoSettings(source_data="faces")
    # the key of the cached digits source model predates the photo source: it must not move
    assert DemoSettings().source_key() == "40ed8524dd75"
    photos = DemoSettings(source_data="photo_patches")
    assert photos.source_key() != DemoSettings().source_key()
    assert photos.source_class_count == len(PHOTOS)
    assert photos.source_data_config().source == "photo_patches"
    assert "17 bundled photographs" in photos.describe()


def test_demo_from_a_photo_source_fine_tunes_on_digits(tiny_demo: DemoSettings) -> None:
    settings = replace(tiny_demo, source_data="photo_patches", patches_per_photo=3, domain_guidance=True)
    results = run_demo(settings)
    # a 17-class source model: its bank spans the photos; the targets take label rows 0..4
    source = next(settings.cache_dir.glob("demo-source-*/run/final/ema/transformer/config.json"))
    assert json.loads(source.read_text())["num_embeds_ada_norm"] == len(PHOTOS)
    for name in ("plain", "diff-tuning"):
        assert results[name]["fid"] >= 0 and results[name]["fid_domain_guidance"] >= 0
    report = (settings.out / "report.md").read_text()
    assert "bundled photographs" in report
    assert (
        STUDY_FINDINGS["photo_patches", "ddpm"] in report and STUDY_FINDINGS["digits", "ddpm"] not in report
    )


def test_every_source_has_the_study_finding_its_report_quotes() -> None:
    assert {source for source, _ in STUDY_FINDINGS} == set(SOURCE_DATA)


def test_demo_photos_cli_plan_uses_the_study_source(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["demo", "photos", "--dry-run", "--cache-dir", str(tmp_path)]) == 0
    plan = capsys.readouterr().out
    study = yaml.safe_load((ROOT / "configs" / "reproduction" / "photos_main.yaml").read_text())["settings"]
    key = DemoSettings(
        **{k: v for k, v in study.items() if k in PHOTO_TEST_BED or k == "source_seed"}
    ).source_key()
    assert f"demo-source-{key}" in plan and "8000 steps" in plan and "demo_photos_out" in plan


@pytest.mark.parametrize(("source", "bad"), [("photo_patches", 17), ("digits", 10)])
def test_a_class_the_built_in_set_lacks_is_refused_by_name(source: str, bad: int) -> None:
    with pytest.raises(
        UserError, match=rf"data.classes has \[{bad}\], which {source} does not have: use classes 0\.\."
    ):
        load_target_images(DataConfig(source=source, classes=[0, bad]), 8, 1)
