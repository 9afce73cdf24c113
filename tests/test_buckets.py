"""Aspect-ratio buckets (``data.buckets``): the buckets, which image goes where, the one-bucket batches and
their exact resume, the bank of every bucket, and the refusals of settings that cannot work."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from difftune.cli import main
from difftune.config.data import BucketSettings, DataConfig
from difftune.config.experiment import ConfigError, load_config
from difftune.data.buckets import (
    Bucket,
    BucketRows,
    bank_shares,
    bucket_sizes,
    bucket_weights,
    nearest_bucket,
    plan_buckets,
)
from difftune.errors import UserError
from difftune.io.images import load_cover_image, load_square_image
from difftune.testing.models import save_sd_pipeline
from difftune.training.build import RunParts
from difftune.training.streams import BucketStreams, step_bucket

# ------------------------------------------------------------------------------------------ the buckets


def test_the_buckets_of_512_px_are_kohyas() -> None:
    """sd-scripts' make_bucket_resolutions((512, 512), 256, 1024, 64): 17 buckets, each within 512² pixels."""
    found = bucket_sizes(512, BucketSettings(enabled=True))
    half = [(256, 1024), (320, 768), (384, 640), (448, 576), (320, 704), (256, 832), (256, 896), (256, 960)]
    expected = {(512, 512)} | {(w, h) for w, h in half} | {(h, w) for w, h in half}
    assert [(b.width, b.height) for b in found] == sorted(expected)
    assert all(b.width * b.height <= 512 * 512 and b.width % 64 == 0 == b.height % 64 for b in found)
    tight = bucket_sizes(512, BucketSettings(enabled=True, min_side=448, max_side=576))
    assert [b.name for b in tight] == ["448x576", "512x512", "576x448"]


@pytest.mark.parametrize(
    "size,bucket",
    [
        ((1920, 1080), "640x384"),
        ((1080, 1920), "384x640"),
        ((500, 500), "512x512"),
        ((3000, 700), "1024x256"),
    ],
)
def test_an_image_goes_to_the_bucket_nearest_its_aspect_ratio(size: tuple[int, int], bucket: str) -> None:
    buckets = bucket_sizes(512, BucketSettings(enabled=True))
    assert buckets[nearest_bucket(size, buckets)].name == bucket


def test_a_plan_lists_the_used_buckets_and_their_images() -> None:
    sizes = [(32, 32), (48, 16), (16, 48), (33, 30), (96, 32), (64, 16)]
    plan = plan_buckets(sizes, 32, BucketSettings(enabled=True, step=16, min_side=16, max_side=64))
    assert [b.name for b in plan.buckets] == ["16x48", "32x32", "48x16", "64x16"]
    assert [m.tolist() for m in plan.members] == [[2], [0, 3], [1, 4], [5]]
    assert plan.line() == "4 of 32² px: 16x48 (1), 32x32 (2), 48x16 (2), 64x16 (1)"
    assert Bucket(48, 16).sample_shape(4, 8) == (4, 2, 6)


def test_an_image_covers_its_bucket_and_is_centre_cropped_not_stretched(tmp_path: Path) -> None:
    array = np.zeros((16, 64, 3), dtype=np.uint8)  # 64 wide: four 16-column stripes
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        array[:, 16 * i : 16 * (i + 1)] = colour
    Image.fromarray(array).save(tmp_path / "wide.png")
    out = load_cover_image(tmp_path / "wide.png", (32, 16), 3)  # already 16 high: the middle 32 columns
    assert out.shape == (3, 16, 32)
    assert torch.equal(out, torch.from_numpy(array[:, 16:48].transpose(2, 0, 1) / 127.5 - 1.0).float())
    square = load_cover_image(tmp_path / "wide.png", (16, 16), 3)
    assert torch.equal(square, load_square_image(tmp_path / "wide.png", 16, 3))  # the square case unchanged


def test_class_folder_images_load_at_their_buckets_size(tmp_path: Path) -> None:
    from difftune.data.targets import load_target_images, planned_buckets

    for name, size in {"cats": (48, 16), "dogs": (16, 48)}.items():
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", size, (40 * i, 0, 0)).save(tmp_path / name / f"{i}.png")
    Image.new("RGB", (30, 33)).save(tmp_path / "dogs" / "square.png")
    cfg = DataConfig(
        source="folder", path=str(tmp_path), resolution=32, buckets=BucketSettings(True, 16, 16, 64)
    )
    plan = planned_buckets(cfg)
    assert plan.line() == "3 of 32² px: 16x48 (2), 32x32 (1), 48x16 (2)"
    images = load_target_images(cfg, 32, 3)
    wide = images.bucket(plan.members[2], (48, 16), "settings")
    assert wide.load(torch.arange(2)).shape == (2, 3, 16, 48) and wide.labels.tolist() == [0, 0]
    assert images.bucket(plan.members[1], (32, 32), "settings").labels.tolist() == [1]
    assert (
        wide.identity != images.bucket(plan.members[2], (48, 16), "other").identity
    )  # settings key the cache


def test_bank_samples_follow_the_targets_buckets() -> None:
    assert bank_shares([5, 3, 1], 6) == [3, 2, 1]
    assert bank_shares([1, 1], 3) == [2, 1]
    assert sum(bank_shares([7, 2, 9, 1], 50)) == 50 and min(bank_shares([100, 1], 5)) == 1
    with pytest.raises(UserError, match=r"bank.num_samples=2 is fewer than the 3 buckets"):
        bank_shares([4, 4, 4], 2)


def test_a_bucket_with_fewer_images_than_a_step_takes_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    buckets = [Bucket(16, 48), Bucket(32, 32), Bucket(64, 16)]
    with caplog.at_level(logging.WARNING):
        weights = bucket_weights([4, 6, 2], 3, buckets)
    assert weights.tolist() == [4.0, 6.0, 0.0]
    assert "fewer than the 3 target images a step takes: 64x16 (2)" in caplog.text
    with pytest.raises(UserError, match=r"no bucket holds the 8 target images a step takes"):
        bucket_weights([4, 6, 2], 8, buckets)


def test_a_step_takes_rows_of_one_bucket_and_resumes_exactly() -> None:
    sizes, weights = [3, 5, 2], torch.tensor([3.0, 5.0, 0.0])
    rows = BucketRows([torch.full((n, 1), float(b)) for b, n in enumerate(sizes)])
    whole, first = BucketStreams(sizes, 7), BucketStreams(sizes, 7)
    drawn = []
    for step in range(40):
        bucket = step_bucket(7, step, weights)
        idx = whole.take(2, bucket)
        assert rows.bucket_of(idx) == bucket and torch.equal(rows[idx], torch.full((2, 1), float(bucket)))
        drawn.append(idx)
        if step < 15:
            assert torch.equal(first.peek(2, bucket), idx) and torch.equal(first.take(2, bucket), idx)
    chosen = [step_bucket(7, step, weights) for step in range(400)]
    assert chosen.count(2) == 0 and 0.25 < chosen.count(0) / 400 < 0.5  # about 3/8
    resumed = BucketStreams(sizes, 7)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint saves it
    for step in range(15, 40):
        assert torch.equal(resumed.take(2, step_bucket(7, step, weights)), drawn[step])
    with pytest.raises(ValueError, match="not in one"):
        rows[torch.tensor([0, 3])]
    with pytest.raises(UserError, match="checkpoint was made with 2 buckets, this run has 3"):
        resumed.load_state_dict({"buckets": first.state_dict()["buckets"][:2]})


# ------------------------------------------------------------------------------------------- refusals

BASE = ["model.pretrained=x/y", "data.source=captions", "data.path=d", "objective.bank_share=0"]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difftune: error:"), lines
    return lines[0]


@pytest.mark.parametrize(
    "settings,message",
    [
        (
            ["data.resolution=500"],
            r"data.resolution=500 is not a multiple of data.buckets.step=64: .*use e.g. 448",
        ),
        ([], r"data.buckets needs data.resolution: the buckets hold data.resolution² pixels"),
        (["data.resolution=512", "data.buckets.step=0"], r"data.buckets.step=0 must be a positive number"),
        (
            ["data.resolution=512", "data.buckets.min_side=100"],
            r"data.buckets.min_side=100 must be a positive multiple",
        ),
        (["data.resolution=512", "data.buckets.min_side=576"], r"min_side=576 and max_side=1024 must hold"),
        (["data.resolution=512", "data.source=digits"], r"data.source=digits has only square images"),
        (["data.resolution=512", "data.annotator=canny"], r"not supported with control images"),
        (["data.resolution=512", "train.eval_every=5"], r"not supported with train.eval_every"),
    ],
    ids=["budget", "no resolution", "step", "min_side step", "min_side", "built-in", "controlnet", "eval"],
)
def test_bucket_settings_that_cannot_work_are_refused_in_one_line(
    settings: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*BASE, "data.buckets.enabled=true", *settings]
    with pytest.raises(ConfigError, match=message):
        load_config(None, args)
    assert main(["train", "--dry-run", *(f"--set={item}" for item in args)]) == 2
    assert re.search(message, _one_error_line(capsys))
    assert not load_config(None, [*BASE, *settings[:1]]).data.buckets.enabled  # off by default


def test_a_model_family_that_samples_at_its_own_size_only_is_refused() -> None:
    import difftune.backbones.families  # noqa: F401  (gives each adapter its family)
    from difftune.backbones.dit import DiTBackbone
    from difftune.data.buckets import check_bucket_model
    from difftune.testing.models import tiny_dit

    with pytest.raises(UserError, match=r"the dit model family trains and samples at its own size only"):
        check_bucket_model(DiTBackbone(tiny_dit()), 1, BucketSettings(enabled=True))
    with pytest.raises(
        UserError, match=r"data.buckets.step=12 is not a multiple of the VAE's downsampling factor 8"
    ):
        check_bucket_model(type("SD", (), {"size_buckets": True})(), 8, BucketSettings(enabled=True, step=12))


# ------------------------------------------------------------------------------- end to end on tiny SD

SIZES = {"square": (32, 32), "wide": (48, 16), "tall": (16, 48), "panorama": (64, 16)}
COUNTS = {"square": 4, "wide": 4, "tall": 3, "panorama": 1}  # the panorama's bucket is too small for a step


def _shapes_folder(root: Path) -> Path:
    """Drawings of circles in images of four aspect ratios, with a metadata.jsonl of captions."""
    root.mkdir(parents=True)
    rows = []
    for kind, count in COUNTS.items():
        for i in range(count):
            w, h = SIZES[kind]
            img = Image.new("RGB", (w, h), "black")
            ImageDraw.Draw(img).ellipse(
                (2 + i, 2, w - 3, h - 3 - i % 2), outline=("red", "blue")[i % 2], width=2
            )
            img.save(root / f"{kind}{i}.png")
            rows.append({"file_name": f"{kind}{i}.png", "text": f"a {('red', 'blue')[i % 2]} circle, {kind}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _write_config(
    tmp_path: Path, sd_dir: Path, data: Path, run: str, steps: int, resume: bool = False
) -> Path:
    raw = {
        "model": {"pretrained": str(sd_dir)},
        "data": {
            "source": "captions",
            "path": str(data),
            "resolution": 32,
            "cache_dir": str(tmp_path / "cache"),
            "buckets": {"enabled": True, "step": 16, "min_side": 16, "max_side": 64},
        },
        "bank": {"path": str(tmp_path / "bank"), "num_samples": 8, "sampling": {"steps": 2}, "batch_size": 4},
        "objective": {"bank_share": 0.25},
        "train": {
            "output_dir": str(tmp_path / run),
            "batch_size": 4,
            "max_steps": steps,
            "checkpoint_every": 3,
            "log_every": 1,
            "learning_rate": 1e-3,
            "ema_decay": 0.9,
            **({"resume": "latest"} if resume else {}),
        },
    }
    path = tmp_path / f"{run}-{steps}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bank_train_and_exact_resume_with_buckets_on_stable_diffusion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    sd_dir = save_sd_pipeline(tmp_path / "pipe")  # 32 px images, 8x VAE, a UNet with one downsampling
    data = _shapes_folder(tmp_path / "shapes")
    expected = "4 of 32² px: 16x48 (3), 32x32 (4), 48x16 (4), 64x16 (1)"

    assert main(["bank", "--config", str(_write_config(tmp_path, sd_dir, data, "a", 6)), "--dry-run"]) == 0
    assert (
        f"buckets: {expected}; bank samples 16x48 (2), 32x32 (3), 48x16 (2), 64x16 (1)"
        in capsys.readouterr().out
    )
    assert main(["bank", "--config", str(_write_config(tmp_path, sd_dir, data, "a", 6))]) == 0
    assert f"(8 samples in the buckets {expected})" in capsys.readouterr().out
    index = json.loads((tmp_path / "bank" / "buckets.json").read_text())
    assert index["buckets"] == [[16, 48, 2], [32, 32, 3], [48, 16, 2], [64, 16, 1]]
    wide = load_file(tmp_path / "bank" / "bucket-48x16" / "shard-00000.safetensors")
    assert wide["samples"].shape == (2, 4, 2, 6) and wide["seeds"].tolist() == [5, 6]  # indices 5 and 6 of 8

    assert main(["train", "--config", str(_write_config(tmp_path, sd_dir, data, "a", 6)), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert (
        f"buckets    {expected}" in dry
        and "bank       8 samples in the buckets 16x48, 32x32, 48x16, 64x16" in dry
    )

    shapes: list[tuple[int, ...]] = []
    original = RunParts.batch

    def recording(self: RunParts, step: int, objective):  # noqa: ANN001, ANN202
        x0, cond, is_bank, draw = original(self, step, objective)
        shapes.append(tuple(x0.shape))
        return x0, cond, is_bank, draw

    monkeypatch.setattr(RunParts, "batch", recording)
    assert main(["train", "--config", str(_write_config(tmp_path, sd_dir, data, "a", 6))]) == 0
    assert (
        "target rows per bucket: 16x48 (3), 32x32 (4), 48x16 (4), 64x16 (1); left out"
        in capsys.readouterr().out
    )
    # every batch is one bucket's 3 target + 1 bank rows; the panorama's bucket never comes up
    assert set(shapes) <= {(4, 4, 6, 2), (4, 4, 4, 4), (4, 4, 2, 6)} and len(set(shapes)) > 1, shapes
    summary = json.loads((tmp_path / "a" / "run_summary.json").read_text())
    assert summary["buckets"] == {
        "rows": {"16x48": 3, "32x32": 4, "48x16": 4, "64x16": 1},
        "left_out": ["64x16"],
    }
    cache = json.loads((tmp_path / "cache" / "bucket-48x16" / "manifest.json").read_text())
    assert cache["bucket"] == [48, 16] and cache["buckets"]["step"] == 16

    assert main(["train", "--config", str(_write_config(tmp_path, sd_dir, data, "b", 3))]) == 0
    shapes_whole, shapes[:] = list(shapes), []
    assert main(["train", "--config", str(_write_config(tmp_path, sd_dir, data, "b", 6, resume=True))]) == 0
    assert shapes == shapes_whole[-3:]  # the resumed steps drew the same buckets
    for sub in ("unet", "ema/unet"):
        a = load_file(tmp_path / "a" / "final" / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "b" / "final" / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert [m["step"] for m in _metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    start = load_file(sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    trained = load_file(tmp_path / "a" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # it trained

    # a changed bucket setting encodes again instead of reading a stale cache; the bank then no longer fits
    raw = yaml.safe_load(_write_config(tmp_path, sd_dir, data, "c", 1).read_text())
    raw["data"]["buckets"]["max_side"] = 48
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert (
        "holds samples of the buckets 16x48, 32x32, 48x16, 64x16, the target's are 16x48, 32x32, 48x16" in err
    )
    cache = json.loads((tmp_path / "cache" / "bucket-48x16" / "manifest.json").read_text())
    assert cache["buckets"]["max_side"] == 48 and cache["num_samples"] == 5  # the panorama joined it
