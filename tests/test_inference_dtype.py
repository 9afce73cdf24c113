"""``--dtype`` of ``difftune sample`` and ``difftune eval fid --checkpoint``: the model runs in bfloat16
(float16 on a CUDA device), the samples and images stay float32, float16 on the CPU is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from difftune.backbones import load_pretrained
from difftune.cli import main
from difftune.commands import inference_dtype
from difftune.commands.sample import sample_to_folder
from difftune.config.sampling import SamplingSpec
from difftune.errors import UserError
from difftune.testing.models import save_pipeline_dir, tiny_dit
from test_evaluation import classifier_path, digits, folders, private_cache, read_folder  # noqa: F401 (fixtures)

SAMPLING = ["--labels", "0,1", "--per-label", "2", "--steps", "3", "--scheduler", "DDIMScheduler"]
SAMPLING += ["--guidance-scale", "2"]
SPEC = SamplingSpec("DDIMScheduler", steps=3, guidance_scale=2.0)
FP16_ON_CPU = "--dtype float16 needs a CUDA device"


def _sample(model: Path, out: Path, *extra: str) -> torch.Tensor:
    assert main(["sample", "--model", str(model), *SAMPLING, "--out", str(out), *extra]) == 0
    (out / "grid.png").unlink()
    return read_folder(out)


@pytest.mark.parametrize("model", ["dit_dir", "latent_dit_dir"])
def test_sample_in_bfloat16_writes_images_close_to_float32_ones(
    model: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Pixel space (the DiT alone) and latent space (the VAE cast too): the same seeds give nearly the
    same images, not bit for bit the same (the model did run in bfloat16)."""
    path = request.getfixturevalue(model)
    full = _sample(path, tmp_path / "float32")
    half = _sample(path, tmp_path / "bfloat16", "--dtype", "bfloat16")
    assert half.shape == full.shape and half.dtype == torch.float32
    assert (half - full).abs().mean() < 0.1  # [0, 1] pixels
    assert not torch.equal(half, full)
    assert json.loads((tmp_path / "bfloat16" / "difftune_samples.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "float32" / "difftune_samples.json").read_text())["dtype"] == "float32"


def test_the_model_the_guide_and_the_vae_run_in_the_dtype_asked_for(
    latent_dit_dir: Path, tmp_path: Path
) -> None:
    """What enters each module is in its dtype (inputs cast where they enter), and the loaded float32
    model is left float32 by sampling without ``dtype``."""
    loaded = load_pretrained(str(latent_dit_dir))
    guide_dir = save_pipeline_dir(
        tmp_path / "guide", tiny_dit(in_channels=4, sample_size=2, seed=3), "transformer"
    )
    guide = load_pretrained(str(guide_dir)).backbone
    seen: dict[str, set[torch.dtype]] = {"model": set(), "guide": set(), "vae": set()}

    def record(name: str):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            seen[name].add(args[0].dtype)
            seen[name].add(next(module.parameters()).dtype)

        return hook

    loaded.backbone.inner.register_forward_pre_hook(record("model"), with_kwargs=True)
    guide.inner.register_forward_pre_hook(record("guide"), with_kwargs=True)
    loaded.codec.vae.decoder.register_forward_pre_hook(record("vae"), with_kwargs=True)
    sample_to_folder(loaded, [0, 1], 2, tmp_path / "out", SPEC, guide=guide, dtype=torch.bfloat16)
    assert seen == {"model": {torch.bfloat16}, "guide": {torch.bfloat16}, "vae": {torch.bfloat16}}
    assert json.loads((tmp_path / "out" / "difftune_samples.json").read_text())["dtype"] == "bfloat16"

    plain = load_pretrained(str(latent_dit_dir))
    sample_to_folder(plain, [0], 1, tmp_path / "plain", SPEC)
    assert {p.dtype for p in plain.backbone.parameters()} == {torch.float32}
    assert {p.dtype for p in plain.codec.vae.parameters()} == {torch.float32}


def test_float16_on_the_cpu_is_one_line(
    dit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU also where a GPU is
    for dry in ([], ["--dry-run"]):
        out = tmp_path / "out"
        argv = ["sample", "--model", str(dit_dir), *SAMPLING, "--dtype", "float16", "--out", str(out), *dry]
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("difftune: error: " + FP16_ON_CPU), lines
        assert "use --dtype bfloat16 on the CPU" in lines[0]
        assert not out.exists()
    with pytest.raises(UserError, match=FP16_ON_CPU):
        inference_dtype("float16", "cpu")
    assert inference_dtype("float16", "cuda") is torch.float16  # no GPU needed to decide
    assert (
        inference_dtype(None, "cpu") is torch.float32 and inference_dtype("bfloat16", "cpu") is torch.bfloat16
    )


def test_dry_run_names_the_dtype(dit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sample", "--model", str(dit_dir), *SAMPLING, "--out", str(tmp_path / "s"), "--dry-run"]
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    assert ", in bfloat16, seeds" in capsys.readouterr().out
    assert main(argv) == 0
    assert "in float32" not in capsys.readouterr().out  # the default is not announced


def test_eval_fid_checkpoint_in_bfloat16_scores_what_sample_writes(
    dit_dir: Path,
    classifier_path: Path,  # noqa: F811
    folders: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real, fake = folders
    features = ["--features", f"digits:{classifier_path}"]
    sampling = ["--num-per-class", "2", *SAMPLING[:2], *SAMPLING[4:]]  # SAMPLING less --per-label
    base = ["eval", "fid", "--real", str(real), "--checkpoint", str(dit_dir), *sampling, *features]

    def score(name: str, *extra: str) -> tuple[np.ndarray, dict]:
        npz, result = tmp_path / f"{name}.npz", tmp_path / f"{name}.json"
        assert main([*base, "--export-npz", str(npz), "--out-json", str(result), *extra]) == 0
        with np.load(npz) as data:
            return data["arr_0"], json.loads(result.read_text())

    half, half_result = score("bf16", "--dtype", "bfloat16")
    full, full_result = score("fp32")
    assert half_result["settings"]["dtype"] == "bfloat16" and full_result["settings"]["dtype"] == "float32"
    assert np.isfinite(half_result["fid"]) and half_result["num_fake"] == 4
    assert np.abs(half.astype(np.float64) - full).mean() / 255 < 0.1 and not np.array_equal(half, full)

    sample_to_folder(load_pretrained(str(dit_dir)), [0, 1], 2, tmp_path / "s", SPEC, dtype=torch.bfloat16)
    (tmp_path / "s" / "grid.png").unlink()  # the same images as `difftune sample --dtype bfloat16` writes
    np.testing.assert_array_equal(
        half, (read_folder(tmp_path / "s").permute(0, 2, 3, 1).numpy() * 255).round()
    )
    capsys.readouterr()

    assert (
        main(["eval", "fid", "--real", str(real), "--fake", str(fake), *features, "--dtype", "bfloat16"]) == 2
    )
    assert "--dtype only apply with --checkpoint" in capsys.readouterr().err
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # the CPU also where a GPU is
    assert main([*base, "--dtype", "float16"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and FP16_ON_CPU in lines[0], lines
