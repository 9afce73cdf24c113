"""Aspect-ratio buckets (``data.buckets``) on Stable Diffusion XL, Stable Diffusion 3 and Flux.1: SDXL's
size ids (``time_ids``) follow each image's original size, crop and bucket, and each bank bucket's size;
SD3 takes any latent within its transformer's positions, at one static flow shift; Flux any even latent,
each bucket at its own size's shift; all bank -> train -> exact resume with one size per batch, on tiny
pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from difftune.backbones.loading import load_pretrained, peek_backbone
from difftune.backbones.sdxl import TIME_IDS
from difftune.cli import main
from difftune.config.experiment import load_config
from difftune.data.buckets import Bucket, check_bucket_fit, largest_bucket
from difftune.data.images import TargetImages
from difftune.errors import UserError
from difftune.process import build_process
from difftune.testing.flux import save_flux_pipeline
from difftune.testing.models import save_sdxl_pipeline
from difftune.testing.sd3 import save_sd3_pipeline
from difftune.training.build import RunParts
from difftune.training.memory_estimate import estimate_training_memory
from test_buckets import _metrics, _one_error_line, _shapes_folder, _write_config

# two images whose buckets crop them: 100x30 goes to 48x16 (resized to 53x16, 2 px off the left),
# 24x80 to 16x48 (resized to 16x53, 2 px off the top)
ODD = {"oddwide": (100, 30), "oddtall": (24, 80)}
IDS = {"oddwide": [30, 100, 0, 2, 16, 48], "oddtall": [80, 24, 2, 0, 48, 16]}
SMALL_WIDE = (("16x16", (2, 2)), ("64x16", (2, 8)))  # the memory estimate traces the size given
EXPECTED = "4 of 32² px: 16x48 (4), 32x32 (4), 48x16 (5), 64x16 (1); largest 32x32"


def _folder(root: Path) -> Path:
    """test_buckets' shapes in four aspect ratios, and the two images of :data:`ODD`."""
    data = _shapes_folder(root)
    with (data / "metadata.jsonl").open("a") as rows:
        for name, size in ODD.items():
            Image.new("RGB", size, "green").save(data / f"{name}.png")
            rows.write(json.dumps({"file_name": f"{name}.png", "text": f"a green {name}"}) + "\n")
    return data


def test_a_buckets_crops_are_its_images_original_sizes_and_centre_crop_offsets() -> None:
    """diffusers' train_text_to_image_sdxl.py: original (h, w), and the crop's (top, left) in the resized
    image; a mirror's left is measured from the other side (kohya's flipped crop)."""
    images = TargetImages(
        torch.zeros(3, dtype=torch.long),
        ["c"],
        "set",
        lambda idx: torch.zeros(len(idx), 3, 32, 32),
        sized=lambda idx, size: torch.zeros(len(idx), 3, size[1], size[0]),
        sizes=lambda: [(32, 32), (100, 30), (24, 80)],
    )
    wide = images.bucket(torch.tensor([1]), (48, 16), "s")
    assert wide.crops(torch.tensor([0]), False).tolist() == [[30, 100, 0, 2]]
    assert wide.crops(torch.tensor([0]), True).tolist() == [[30, 100, 0, 3]]  # 53 - 48 - 2
    tall = images.bucket(torch.tensor([0, 2]), (16, 48), "s")
    assert tall.crops(torch.tensor([0, 1]), False).tolist() == [[32, 32, 0, 16], [80, 24, 2, 0]]  # 32² -> 48²
    with pytest.raises(ValueError, match="only a bucket's images"):
        images.crops(torch.tensor([0]), False)
    assert largest_bucket([Bucket(16, 48), Bucket(48, 16), Bucket(64, 16)]).name == "64x16"
    assert (
        largest_bucket([Bucket(16, 64), Bucket(32, 32), Bucket(64, 16)]).name == "16x64"
    )  # a tie: the first


def _config(tmp_path: Path, pipe: Path, data: Path, run: str, steps: int, resume: bool = False) -> Path:
    return _write_config(tmp_path, pipe, data, run, steps, resume)


def _bank_and_train(
    tmp_path: Path, pipe: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> list[tuple[tuple[int, ...], torch.Tensor | None]]:
    """Bank, dry run, train 6 steps (run a), train 3 then resume to 6 (run b): the batches of run a, each
    its shape and (SDXL) its time_ids; asserts the resumed run equals run a."""
    data = _folder(tmp_path / "shapes")
    assert main(["bank", "--config", str(_config(tmp_path, pipe, data, "a", 6))]) == 0
    assert "(8 samples in the buckets 4 of 32² px" in capsys.readouterr().out
    assert main(["train", "--config", str(_config(tmp_path, pipe, data, "a", 6)), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert f"buckets    {EXPECTED}" in dry
    assert "(micro-batch 4, largest bucket 32x32)" in dry  # its activations traced at the largest bucket
    cfg = load_config(_config(tmp_path, pipe, data, "a", 6))
    channels = peek_backbone(str(pipe)).sample_shape[0]
    small, wide = (
        estimate_training_memory(cfg, peek_backbone(str(pipe)), bucket=(name, (channels, *size)))
        for name, size in SMALL_WIDE
    )
    assert small.activations and wide.activations and small.activations < wide.activations

    batches: list[tuple[tuple[int, ...], torch.Tensor | None]] = []
    original = RunParts.batch

    def recording(self: RunParts, step: int, objective):  # noqa: ANN001, ANN202
        x0, cond, is_bank, draw = original(self, step, objective)
        batches.append((tuple(x0.shape), cond[TIME_IDS].clone() if TIME_IDS in cond else None))
        return x0, cond, is_bank, draw

    monkeypatch.setattr(RunParts, "batch", recording)
    assert main(["train", "--config", str(_config(tmp_path, pipe, data, "a", 6))]) == 0
    assert "target rows per bucket: 16x48 (4), 32x32 (4), 48x16 (5), 64x16 (1)" in capsys.readouterr().out
    shapes = [shape for shape, _ in batches]
    assert {s[2:] for s in shapes} <= {(6, 2), (4, 4), (2, 6)} and len(set(shapes)) > 1, shapes
    whole = list(batches)

    assert main(["train", "--config", str(_config(tmp_path, pipe, data, "b", 3))]) == 0
    batches[:] = []
    assert main(["train", "--config", str(_config(tmp_path, pipe, data, "b", 6, resume=True))]) == 0
    assert [shape for shape, _ in batches] == shapes[-3:]  # the resumed steps drew the same buckets
    sub = next(p.name for p in (tmp_path / "a" / "final").iterdir() if p.name in ("unet", "transformer"))
    for part in (sub, f"ema/{sub}"):
        a = load_file(tmp_path / "a" / "final" / part / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "b" / "final" / part / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    return whole


def test_sdxl_size_ids_follow_each_images_bucket_and_crop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = save_sdxl_pipeline(tmp_path / "pipe")
    batches = _bank_and_train(tmp_path, pipe, capsys, monkeypatch)

    # the target cache: each image's original size, crop offsets and its bucket as the target size
    allowed: dict[tuple[int, int], list[list[int]]] = {}
    for bucket, name, (w, h) in (("48x16", "oddwide", (48, 16)), ("16x48", "oddtall", (16, 48))):
        cache = load_file(tmp_path / "cache" / f"bucket-{bucket}" / "shard-00000.safetensors")
        rows = cache[TIME_IDS].long().tolist()
        assert IDS[name] in rows, rows
        plain = [row for row in rows if row != IDS[name]]  # the drawings: of the bucket's own size, uncropped
        assert len(plain) == len(rows) - 1 and all(row == [h, w, 0, 0, h, w] for row in plain), rows
        allowed[(h // 8, w // 8)] = rows
    # a bank bucket's samples: generated at its size, uncropped
    for bucket, (w, h) in {"48x16": (48, 16), "16x48": (16, 48), "32x32": (32, 32)}.items():
        bank = load_file(tmp_path / "bank" / f"bucket-{bucket}" / "shard-00000.safetensors")
        assert bank["samples"].shape[-2:] == (h // 8, w // 8)
        assert bank[TIME_IDS].long().tolist() == [[h, w, 0, 0, h, w]] * len(bank["seeds"])
    # every row of a batch, target or bank, has its batch's size as the target size, and its cached ids
    for shape, ids in batches:
        assert ids is not None and ids[:, 4:].long().tolist() == [[8 * shape[2], 8 * shape[3]]] * shape[0]
        assert all(row in allowed.get(shape[2:], [row]) for row in ids.long().tolist()), (shape, ids)

    # samples and the stock pipeline: the model's own size
    final = tmp_path / "a" / "final"
    args = ["sample", "--model", str(final), "--prompt", "a red circle", "--per-label", "1", "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "s")]) == 0
    assert [Image.open(p).size for p in (tmp_path / "s").glob("0*.png")] == [(32, 32)]
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(final)
    image = pipeline("a red circle", num_inference_steps=2, height=16, width=48, output_type="np").images
    assert image.shape == (1, 16, 48, 3)  # the stock pipeline at a bucket's size
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.from_pretrained(tmp_path / "a" / "final")


def test_sd3_trains_buckets_at_one_static_shift(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = save_sd3_pipeline(tmp_path / "pipe")
    config = json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())
    assert not config.get("use_dynamic_shifting")  # SD3's shift does not depend on the resolution ...
    sigmas = [build_process(config, (4, h, w)).sigmas for h, w in ((6, 2), (4, 4), (2, 6), (2, 8))]
    assert all(torch.equal(sigmas[0], s) for s in sigmas[1:])  # ... so every bucket has one process
    _bank_and_train(tmp_path, pipe, capsys, monkeypatch)
    for bucket, (w, h) in {"48x16": (48, 16), "16x48": (16, 48)}.items():
        bank = load_file(tmp_path / "bank" / f"bucket-{bucket}" / "shard-00000.safetensors")
        assert bank["samples"].shape[-2:] == (h // 8, w // 8)


def test_an_sd3_bucket_beyond_the_transformers_positions_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny transformer places 8 patches of 2 a side (16 latent, 128 px); at 64² px a 320x20 image
    goes to the bucket 256x16, whose latent is 32 wide."""
    pipe = save_sd3_pipeline(tmp_path / "pipe")
    data = tmp_path / "strip"
    data.mkdir()
    Image.new("RGB", (320, 20), "white").save(data / "strip.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "strip.png", "text": "a strip"}) + "\n")
    raw = yaml.safe_load(_config(tmp_path, pipe, data, "a", 2).read_text())
    raw["data"]["resolution"] = 64
    raw["data"]["buckets"] = {"enabled": True, "step": 16, "min_side": 16, "max_side": 256}
    raw["objective"]["bank_share"] = 0  # the dry run then reads no bank (there is none)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    message = (
        "data.buckets: the model cannot take the bucket 256x16: its latent 32x2 has more than the "
        "transformer's pos_embed_max_size=8 patches of 2 a side; lower data.buckets.max_side"
    )
    capsys.readouterr()
    for command in (["train", "--dry-run"], ["bank"]):
        assert main([command[0], "--config", str(tmp_path / "c.yaml"), *command[1:]]) == 2
        assert message in _one_error_line(capsys)


def test_flux_trains_each_bucket_on_its_own_sizes_shift(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flux's shift grows with the token count (use_dynamic_shifting): a bucket's latents are noised on
    the σ grid fixed for their size, as FluxPipeline samples an image of that size, and its bank
    samples are generated at it."""
    pipe = save_flux_pipeline(tmp_path / "pipe")
    config = json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())
    assert config["use_dynamic_shifting"]
    process = build_process(config, (16, 4, 4))
    for size in ((6, 2), (4, 4), (2, 6), (2, 8)):
        torch.testing.assert_close(process.sigmas_for((16, *size)), build_process(config, (16, *size)).sigmas)
    assert torch.equal(process.sigmas_for((16, 4, 4)), process.sigmas)
    wide = process.sigmas_for((16, 2, 6))  # 3 tokens against the model's 4: another (slightly smaller) shift
    assert (process.sigmas - wide).min() > -1e-6 and (process.sigmas - wide).max() > 1e-5  # float32 grids
    big = process.sigmas_for((16, 64, 64))  # 1024 tokens: noisier all along (μ 0.5 -> 0.68)
    assert big.mean() > process.sigmas.mean() + 0.02
    x0, noise, t = torch.randn(2, 16, 2, 6), torch.randn(2, 16, 2, 6), torch.tensor([100, 700])
    sigma = wide[t].float().view(2, 1, 1, 1)
    torch.testing.assert_close(process.noised(x0, noise, t), (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(process.model_input(x0, t)[1], wide[t].float() * 1000)
    torch.testing.assert_close(process.x0(noise - x0, process.noised(x0, noise, t), t), x0)

    _bank_and_train(tmp_path, pipe, capsys, monkeypatch)
    for bucket, (w, h) in {"48x16": (48, 16), "16x48": (16, 48)}.items():
        bank = load_file(tmp_path / "bank" / f"bucket-{bucket}" / "shard-00000.safetensors")
        assert bank["samples"].shape[1:] == (16, h // 8, w // 8)
        assert bank["guidance"].tolist() == [3.5] * len(bank["seeds"])


def test_a_flux_bucket_with_an_odd_latent_side_is_refused(tmp_path: Path) -> None:
    backbone = load_pretrained(str(save_flux_pipeline(tmp_path / "pipe"))).backbone
    with pytest.raises(UserError, match=r"the bucket 40x24: its latent 5x3 has an odd side, and Flux packs"):
        check_bucket_fit(backbone, [Bucket(32, 32), Bucket(40, 24)], 8)
    check_bucket_fit(backbone, [Bucket(48, 16), Bucket(16, 48)], 8)
