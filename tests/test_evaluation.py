"""``difftune eval fid``: folders, cached statistics, sampling from a checkpoint, KID, precision/recall, errors.

Everything runs on the CPU with a small digit classifier as the feature extractor; nothing is downloaded
(the real Inception network is never built: only its wrapper and its error paths are tested).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import run_torchrun
from difftune.cli import USER_ERRORS
from difftune.commands.eval_fid import add_parser as add_eval_parser
from difftune.data.builtin import load_sklearn_digits
from difftune.io.images import list_images, save_png
from difftune.io.store import folder_identity
from difftune.metrics import (
    DigitFeatureExtractor,
    FeatureStats,
    compute_feature_stats,
    fid_from_images,
    load_classifier,
    save_classifier,
    train_digit_classifier,
)
from difftune.metrics.inception import InceptionFeatureExtractor, inception_extractor
from difftune.metrics.kid import kernel_inception_distance, precision_recall, stats_from_features
from difftune.metrics.reference_cache import reference_stats_key
from difftune.testing.processes import torchrun_command

TESTS = Path(__file__).parent


def run_eval(argv: list[str]) -> int:
    """What ``difftune eval ...`` does once cli.py calls :func:`add_eval_parser` (one-line user errors)."""
    parser = argparse.ArgumentParser(prog="difftune")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"difftune: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2


def parse_metrics(out: str) -> dict[str, float]:
    return {
        line.split()[0]: float(line.split()[1]) for line in out.strip().splitlines() if len(line.split()) == 2
    }


def write_folder(root: Path, images: torch.Tensor, nested: bool = False) -> Path:
    """Save images (N, C, H, W) in [0, 1] as PNGs (half of them in a sub-folder when ``nested``)."""
    for i, image in enumerate(images):
        sub = root / "sub" if nested and i % 2 else root
        save_png(image, sub / f"{i:03d}.png")
    return root


def read_folder(root: Path) -> torch.Tensor:
    """Independent loader: every PNG under ``root`` (sorted) as float RGB (N, 3, H, W) in [0, 1]."""
    paths = sorted(root.rglob("*.png"))
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_sklearn_digits()


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    images, labels = digits
    path = tmp_path_factory.mktemp("clf") / "digits.safetensors"
    save_classifier(train_digit_classifier(images, labels, steps=100, seed=0), path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, digits) -> tuple[Path, Path]:
    """A reference folder (40 digits, nested) and a 'generated' one (30 other digits, blurred a little)."""
    images, _ = digits
    root = tmp_path_factory.mktemp("imgs")
    fake = images[100:130]
    fake = (0.7 * fake + 0.3 * fake.roll(1, dims=-1)).clamp(0, 1)
    return write_folder(root / "real", images[:40], nested=True), write_folder(root / "fake", fake)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own user cache, so the automatic statistics cache never leaks between tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "difftune" / "fid_stats"


def test_fid_between_folders_equals_fid_from_images(folders, classifier_path, tmp_path, capsys) -> None:
    real, fake = folders
    out_json = tmp_path / "res" / "fid.json"
    rc = run_eval(
        [
            "fid",
            "--real",
            str(real),
            "--fake",
            str(fake),
            "--features",
            f"digits:{classifier_path}",
            "--batch-size",
            "7",
            "--out-json",
            str(out_json),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    assert rc == 0
    assert list((tmp_path / "work").iterdir()) == []  # the partial results are removed
    printed = parse_metrics(capsys.readouterr().out)
    extractor = DigitFeatureExtractor(load_classifier(classifier_path))
    expected = fid_from_images(read_folder(real), read_folder(fake), extractor)
    assert expected > 1.0  # the sets differ: a test that cannot fail is a defect
    assert printed["fid"] == pytest.approx(expected, rel=1e-6)
    record = json.loads(out_json.read_text())
    assert record["fid"] == pytest.approx(expected, rel=1e-6)
    assert (record["num_real"], record["num_fake"], record["feature_dim"], record["num_processes"]) == (
        40,
        30,
        64,
        1,
    )
    assert record["settings"]["features"] == f"digits:{classifier_path}"


def test_cached_reference_stats_give_identical_fid(folders, classifier_path, tmp_path, capsys) -> None:
    real, fake = folders
    stats = tmp_path / "cache" / "real.npz"
    common = ["--fake", str(fake), "--features", f"digits:{classifier_path}"]
    assert run_eval(["fid", "--real", str(real), "--save-real-stats", str(stats), *common]) == 0
    first = capsys.readouterr().out
    loaded = FeatureStats.load(stats, num_features=64)
    assert loaded.count == 40
    assert run_eval(["fid", "--real", str(stats), *common]) == 0
    assert capsys.readouterr().out == first


def test_reference_statistics_are_cached_and_invalidated(
    folders, classifier_path, private_cache, tmp_path, capsys
) -> None:
    real_src, fake = folders
    real = tmp_path / "real"
    shutil.copytree(real_src, real)  # this test changes the folder
    common = ["--fake", str(fake), "--features", f"digits:{classifier_path}"]
    extractor = DigitFeatureExtractor(load_classifier(classifier_path))
    fake_stats = compute_feature_stats(read_folder(fake), extractor)

    assert run_eval(["fid", "--real", str(real), *common]) == 0
    first = parse_metrics(capsys.readouterr().out)["fid"]
    (entry,) = private_cache.iterdir()  # the default cache is $XDG_CACHE_HOME/difftune/fid_stats
    assert FeatureStats.load(entry).count == 40
    assert run_eval(["fid", "--real", str(real), *common]) == 0
    out, err = capsys.readouterr()
    assert parse_metrics(out)["fid"] == first and f"from the cache: {entry}" in err

    # the entry is what the second run reads: planting the generated set's own statistics gives FID 0
    FeatureStats(fake_stats.mu, fake_stats.sigma, 40).save(entry)
    assert run_eval(["fid", "--real", str(real), *common]) == 0
    assert parse_metrics(capsys.readouterr().out)["fid"] == pytest.approx(0.0, abs=1e-3)
    # ... unless KID needs the reference features, which are then recomputed
    assert run_eval(["fid", "--real", str(real), "--kid", "--kid-subset-size", "10", *common]) == 0
    assert parse_metrics(capsys.readouterr().out)["fid"] == pytest.approx(first, rel=1e-6)

    # touching an image makes a new entry; a damaged entry is recomputed and overwritten
    image = next(real.rglob("*.png"))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert run_eval(["fid", "--real", str(real), *common]) == 0
    assert parse_metrics(capsys.readouterr().out)["fid"] == pytest.approx(first, rel=1e-6)
    (new,) = set(private_cache.iterdir()) - {entry}
    new.write_bytes(b"not an npz")
    assert run_eval(["fid", "--real", str(real), *common]) == 0
    assert parse_metrics(capsys.readouterr().out)["fid"] == pytest.approx(first, rel=1e-6)
    assert FeatureStats.load(new).count == 40

    # an added image is another new entry, counted in the statistics
    shutil.copy(image, real / "extra.png")
    custom = tmp_path / "custom_cache"
    assert run_eval(["fid", "--real", str(real), "--stats-cache", str(custom), *common]) == 0
    capsys.readouterr()
    (added,) = custom.iterdir()
    assert FeatureStats.load(added).count == 41
    assert len(list(private_cache.iterdir())) == 2


def test_statistics_cache_can_be_off_and_skips_custom_extractors(folders, classifier_path, tmp_path) -> None:
    real, fake = folders
    common = ["fid", "--real", str(real), "--fake", str(fake)]
    cache = tmp_path / "c"
    assert (
        run_eval(
            [
                *common,
                "--features",
                f"digits:{classifier_path}",
                "--stats-cache",
                str(cache),
                "--no-stats-cache",
            ]
        )
        == 2
    )
    assert run_eval([*common, "--features", f"digits:{classifier_path}", "--no-stats-cache"]) == 0
    assert not (tmp_path / "xdg").exists()
    files = folder_identity(real, list_images(real))
    assert len(files) == 40 and files[0][0] == "000.png" and files[-1][0] == "sub/039.png"
    assert reference_stats_key(files, "my_features:extractor") is None
    assert reference_stats_key(files, f"digits:{tmp_path / 'missing.safetensors'}") is None
    key = reference_stats_key(files, f"digits:{classifier_path}")
    assert key is not None and key != reference_stats_key(files, f"digits:{classifier_path}", resize=16)
    assert key != reference_stats_key(files, "inception")
    assert key != reference_stats_key(files[1:], f"digits:{classifier_path}")


def test_builtin_dataset_as_reference(folders, classifier_path, private_cache, capsys) -> None:
    _, fake = folders
    assert (
        run_eval(
            [
                "fid",
                "--real",
                "digits:9,5,6,7,8",
                "--fake",
                str(fake),
                "--features",
                f"digits:{classifier_path}",
            ]
        )
        == 0
    )
    printed = parse_metrics(capsys.readouterr().out)["fid"]
    images, labels = load_sklearn_digits()
    reference = ((images[labels >= 5] * 255).round() / 255).expand(
        -1, 3, -1, -1
    )  # as 8-bit RGB files hold them
    extractor = DigitFeatureExtractor(load_classifier(classifier_path))
    assert printed == pytest.approx(fid_from_images(reference, read_folder(fake), extractor), rel=1e-6)
    (entry,) = private_cache.iterdir()
    assert FeatureStats.load(entry).count == int((labels >= 5).sum())
    # the class order does not matter: the same cache entry
    assert (
        run_eval(
            [
                "fid",
                "--real",
                "digits:5,6,7,8,9",
                "--fake",
                str(fake),
                "--features",
                f"digits:{classifier_path}",
            ]
        )
        == 0
    )
    assert parse_metrics(capsys.readouterr().out)["fid"] == printed
    assert list(private_cache.iterdir()) == [entry]
    for bad in ("digits:5,x", "digits:12", "digits:"):
        assert (
            run_eval(["fid", "--real", bad, "--fake", str(fake), "--features", f"digits:{classifier_path}"])
            == 2
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "digit classes 0-9" in err, err


def test_checkpoint_samples_equal_difftune_sample_folder(
    dit_dir, classifier_path, folders, tmp_path, capsys
) -> None:
    from difftune.backbones import load_pretrained
    from difftune.commands.sample import sample_to_folder
    from difftune.config.sampling import SamplingSpec

    real, _ = folders
    npz = tmp_path / "samples.npz"
    sampling = [
        "--num-per-class",
        "2",
        "--labels",
        "0,1,3",
        "--scheduler",
        "DDIMScheduler",
        "--steps",
        "3",
        "--guidance-scale",
        "2.0",
        "--seed",
        "5",
    ]
    rc = run_eval(
        [
            "fid",
            "--real",
            str(real),
            "--checkpoint",
            str(dit_dir),
            *sampling,
            "--features",
            f"digits:{classifier_path}",
            "--export-npz",
            str(npz),
            "--batch-size",
            "4",
        ]
    )
    assert rc == 0
    from_checkpoint = parse_metrics(capsys.readouterr().out)["fid"]
    assert np.isfinite(from_checkpoint) and from_checkpoint > 0

    with np.load(npz) as data:
        assert data.files == ["arr_0"]
        arr = data["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (6, 8, 8, 3)
    assert (arr[..., 0] == arr[..., 2]).all()  # grey samples repeated to RGB

    # the same images as `difftune sample` writes: same labels, seeds, scheduler and rounding
    folder = tmp_path / "sampled"
    spec = SamplingSpec("DDIMScheduler", steps=3, guidance_scale=2.0, seed=5)
    sample_to_folder(load_pretrained(str(dit_dir)), [0, 1, 3], 2, folder, spec, batch_size=4)
    (folder / "grid.png").unlink()
    np.testing.assert_array_equal(arr, (read_folder(folder).permute(0, 2, 3, 1).numpy() * 255).round())
    assert (
        run_eval(
            ["fid", "--real", str(real), "--fake", str(folder), "--features", f"digits:{classifier_path}"]
        )
        == 0
    )
    assert parse_metrics(capsys.readouterr().out)["fid"] == pytest.approx(from_checkpoint, rel=1e-6)


def test_checkpoint_uses_all_classes_by_default(dit_dir, classifier_path, folders, tmp_path, capsys) -> None:
    real, _ = folders
    npz = tmp_path / "all.npz"
    rc = run_eval(
        [
            "fid",
            "--real",
            str(real),
            "--checkpoint",
            str(dit_dir),
            "--num-per-class",
            "1",
            "--steps",
            "2",
            "--features",
            f"digits:{classifier_path}",
            "--export-npz",
            str(npz),
            "--out-json",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 0
    with np.load(npz) as data:
        assert data["arr_0"].shape == (5, 8, 8, 3)  # the tiny DiT has 5 classes
    assert (
        json.loads((tmp_path / "r.json").read_text())["settings"]["scheduler"]
        == "DPMSolverMultistepScheduler"
    )


def test_checkpoint_prefers_ema_weights(classifier_path, folders, tmp_path) -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from conftest import tiny_dit
    from difftune.backbones import LatentCodec, LoadedModel
    from difftune.backbones.dit import DiTBackbone
    from difftune.backbones.saving import save_model

    backbone = DiTBackbone(tiny_dit())
    ema = EMAModel(list(backbone.inner.parameters()))
    ema.shadow_params = [p.detach() + 0.5 * torch.randn_like(p) for p in backbone.inner.parameters()]
    ckpt = tmp_path / "ckpt"
    save_model(LoadedModel(backbone, LatentCodec(), dict(DDPMScheduler().config), "tiny", None), ckpt, ema)
    real, _ = folders

    def samples(*extra: str) -> np.ndarray:
        npz = tmp_path / "s.npz"
        assert (
            run_eval(
                [
                    "fid",
                    "--real",
                    str(real),
                    "--checkpoint",
                    str(ckpt),
                    "--num-per-class",
                    "1",
                    "--steps",
                    "2",
                    "--features",
                    f"digits:{classifier_path}",
                    "--export-npz",
                    str(npz),
                    *extra,
                ]
            )
            == 0
        )
        with np.load(npz) as data:
            return data["arr_0"]

    default, ema_sub, trained = samples(), samples("--subfolder", "ema/transformer"), samples("--no-ema")
    np.testing.assert_array_equal(default, ema_sub)
    assert (default != trained).any()


def test_kid_and_precision_recall_on_the_command_line(folders, classifier_path, tmp_path, capsys) -> None:
    real, fake = folders
    base = [
        "fid",
        "--real",
        str(real),
        "--features",
        f"digits:{classifier_path}",
        "--kid",
        "--kid-subsets",
        "20",
        "--kid-subset-size",
        "25",
        "--precision-recall",
        "--seed",
        "3",
    ]
    with pytest.raises(ValueError, match="--seed only apply with --checkpoint"):
        _raw([*base, "--fake", str(fake)])
    base = base[:-2]
    assert run_eval([*base, "--fake", str(real)]) == 0
    same = parse_metrics(capsys.readouterr().out)
    assert same["fid"] == pytest.approx(0.0, abs=1e-3)
    assert same["precision"] == same["recall"] == 1.0
    assert run_eval([*base, "--fake", str(fake), "--out-json", str(tmp_path / "r.json")]) == 0
    other = json.loads((tmp_path / "r.json").read_text())

    extractor = DigitFeatureExtractor(load_classifier(classifier_path))
    with torch.no_grad():
        f_real, f_fake = extractor(read_folder(real)), extractor(read_folder(fake))
    kid, kid_std, size = kernel_inception_distance(f_real, f_fake, subsets=20, subset_size=25, seed=0)
    assert (other["kid"], other["kid_std"], other["kid_subset_size"]) == (
        pytest.approx(kid, rel=1e-6),
        pytest.approx(kid_std, rel=1e-6),
        25,
    )
    assert kid > 0
    assert (other["precision"], other["recall"]) == pytest.approx(precision_recall(f_real, f_fake, k=3))


def test_kid_matches_unbiased_mmd_and_grows_with_shift() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(50, 8, generator=gen, dtype=torch.float64) + 0.3

    # one subset as large as the smaller set: an independent numpy version of the unbiased estimator
    def k(a, b):
        return (a @ b.T / a.shape[1] + 1.0) ** 3

    xs, ys = x[:50].numpy(), y.numpy()
    m = 50
    kxx, kyy = k(xs, xs), k(ys, ys)
    expected = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * k(
        xs, ys
    ).mean()
    kid, std, size = kernel_inception_distance(x[:50], y, subsets=3, subset_size=1000)
    assert size == 50 and kid == pytest.approx(expected, rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)

    # two independent samples of one distribution: ~0 (unbiased); a shifted one: grows with the shift
    a, b = torch.randn(2, 400, 8, generator=gen, dtype=torch.float64)
    same = kernel_inception_distance(a, b, subsets=20, subset_size=200)[0]
    shifted = [kernel_inception_distance(a, b + s, subsets=20, subset_size=200)[0] for s in (0.25, 0.5)]
    assert abs(same) < 0.1 * shifted[0] and 2 * shifted[0] < shifted[1]


def test_precision_recall_small_cases() -> None:
    real = torch.arange(6, dtype=torch.float64)[:, None]  # 0..5: every 1-NN radius is 1
    fake = torch.tensor([[0.5], [10.0]])  # 1-NN radius of each is 9.5
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    x = torch.randn(40, 4)
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_stats_from_features_matches_numpy() -> None:
    f = np.random.default_rng(0).normal(size=(30, 5))
    stats = stats_from_features(f)
    np.testing.assert_allclose(stats.mu, f.mean(0))
    np.testing.assert_allclose(stats.sigma, np.cov(f, rowvar=False))
    assert stats.count == 30


def test_custom_extractor_module_function(folders, tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "my_features.py").write_text(
        "import torch\n"
        "def extractor():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 6))\n"
        "def not_a_module():\n"
        "    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    real, fake = folders
    assert (
        run_eval(["fid", "--real", str(real), "--fake", str(fake), "--features", "my_features:extractor"])
        == 0
    )
    printed = parse_metrics(capsys.readouterr().out)["fid"]
    torch.manual_seed(0)
    ext = nn.Sequential(nn.Flatten(), nn.Linear(192, 6))
    assert printed == pytest.approx(fid_from_images(read_folder(real), read_folder(fake), ext), rel=1e-6)

    # a custom extractor has no num_features: a mismatched cache is caught once features exist
    bad = tmp_path / "d5.npz"
    FeatureStats(np.zeros(5), np.eye(5), 10).save(bad)
    with pytest.raises(ValueError, match=r"d5\.npz: feature dimension mismatch.*5.*6"):
        _raw(["fid", "--real", str(bad), "--fake", str(fake), "--features", "my_features:extractor"])
    with pytest.raises(ValueError, match="returned int, expected a torch.nn.Module"):
        _raw(["fid", "--real", str(real), "--fake", str(fake), "--features", "my_features:not_a_module"])


def _raw(argv: list[str]) -> int:
    """Parse and run without the one-line error handling, so tests can inspect the exception."""
    parser = argparse.ArgumentParser(prog="difftune")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


def test_inception_with_missing_weights_is_one_line_error(folders, tmp_path, capsys) -> None:
    real, fake = folders
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    rc = run_eval(["fid", "--real", str(real), "--fake", str(fake), "--inception-weights", str(missing)])
    err = capsys.readouterr().err
    assert rc == 2
    assert (
        err.count("\n") == 1 and err.startswith("difftune: error: Inception weights") and str(missing) in err
    )


def test_inception_without_torch_fidelity_says_how_to_install(tmp_path, monkeypatch) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="pip install torch-fidelity") as info:
        inception_extractor(weights)
    assert "\n" not in str(info.value)


def test_inception_wrapper_feeds_rounded_uint8_rgb() -> None:
    seen = []

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return torch.zeros(x.shape[0], 2048)

    ext = InceptionFeatureExtractor(Net())
    grey = torch.tensor([0.0, 0.5 / 255, 1.6 / 255, 1.0]).reshape(1, 1, 2, 2)
    assert ext(grey).shape == (1, 2048) and ext.num_features == 2048
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (1, 3, 2, 2)
    assert seen[0][0, :, 0, 1].tolist() == [0, 0, 0] and seen[0][0, 2].flatten().tolist() == [0, 0, 2, 255]
    ext.train()
    assert not ext.training


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("missing_real", FileNotFoundError, "does not exist"),
        ("empty_fake", ValueError, r"no images \(\.png, \.jpg, .*\.webp.*\) in"),
        ("corrupt", ValueError, r"cannot read image .*broken\.png"),
        ("stats_dim", ValueError, r"feature dimension mismatch, file has 5.*gives 64"),
        ("missing_stats", FileNotFoundError, "do not exist"),
        ("sizes", ValueError, "--resize"),
        ("sampling_with_fake", ValueError, "--steps only apply with --checkpoint"),
        ("bad_features", ValueError, "valid: inception, digits:PATH, module:function"),
        ("missing_classifier", FileNotFoundError, "digit classifier"),
        ("missing_checkpoint", FileNotFoundError, "does not exist"),
        ("kid_with_stats", ValueError, "need reference images"),
    ],
)
def test_bad_inputs(case, error, match, folders, classifier_path, tmp_path) -> None:
    real, fake = folders
    feats = ["--features", f"digits:{classifier_path}"]
    stats = tmp_path / "d5.npz"
    FeatureStats(np.zeros(5), np.eye(5), 10).save(stats)
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    broken = write_folder(tmp_path / "broken", torch.rand(3, 1, 8, 8))
    (broken / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    sizes = write_folder(tmp_path / "sizes", torch.rand(3, 1, 8, 8))
    save_png(torch.rand(1, 9, 9), sizes / "odd.png")
    argv = {
        "missing_real": ["--real", str(tmp_path / "nope"), "--fake", str(fake), *feats],
        "empty_fake": ["--real", str(real), "--fake", str(tmp_path / "empty"), *feats],
        "corrupt": ["--real", str(broken), "--fake", str(fake), *feats],
        "stats_dim": ["--real", str(stats), "--fake", str(fake), *feats],
        "missing_stats": ["--real", str(tmp_path / "none.npz"), "--fake", str(fake), *feats],
        "sizes": ["--real", str(sizes), "--fake", str(fake), *feats],
        "sampling_with_fake": ["--real", str(real), "--fake", str(fake), "--steps", "3", *feats],
        "bad_features": ["--real", str(real), "--fake", str(fake), "--features", "dinov2"],
        "missing_classifier": [
            "--real",
            str(real),
            "--fake",
            str(fake),
            "--features",
            "digits:/no/such.safetensors",
        ],
        "missing_checkpoint": ["--real", str(real), "--checkpoint", str(tmp_path / "no_model"), *feats],
        "kid_with_stats": ["--real", str(stats), "--fake", str(fake), "--kid", *feats],
    }[case]
    with pytest.raises(error, match=match) as info:
        _raw(["fid", *argv])
    assert "\n" not in str(info.value)


def test_webp_folder_is_scored_like_png(folders, classifier_path, tmp_path, capsys) -> None:
    """Every format training accepts is accepted here too: lossless WebP gives the PNGs' FID exactly."""
    real, fake = folders
    webp = tmp_path / "webp"
    webp.mkdir()
    for path in list_images(fake):
        Image.open(path).save(webp / f"{path.stem}.webp", lossless=True)
    feats = ["--features", f"digits:{classifier_path}"]
    assert run_eval(["fid", "--real", str(real), "--fake", str(fake), *feats]) == 0
    from_png = parse_metrics(capsys.readouterr().out)["fid"]
    assert run_eval(["fid", "--real", str(real), "--fake", str(webp), *feats]) == 0
    assert parse_metrics(capsys.readouterr().out)["fid"] == from_png


def test_resize_makes_mixed_sizes_comparable(folders, classifier_path, tmp_path, capsys) -> None:
    real, _ = folders
    mixed = write_folder(tmp_path / "mixed", torch.rand(4, 1, 8, 8))
    save_png(torch.rand(1, 16, 16), mixed / "big.png")
    rc = run_eval(
        [
            "fid",
            "--real",
            str(real),
            "--fake",
            str(mixed),
            "--resize",
            "8",
            "--features",
            f"digits:{classifier_path}",
            "--export-npz",
            str(tmp_path / "m.npz"),
        ]
    )
    assert rc == 0 and np.isfinite(parse_metrics(capsys.readouterr().out)["fid"])
    with np.load(tmp_path / "m.npz") as data:
        assert data["arr_0"].shape == (5, 8, 8, 3)


def test_dry_run_validates_and_prints_plan(folders, tmp_path, capsys) -> None:
    real, fake = folders
    # no extractor is built in a dry run, so the default (downloading) Inception is not touched
    assert run_eval(["fid", "--real", str(real), "--fake", str(fake), "--dry-run"]) == 0
    assert "would score 30 generated images" in capsys.readouterr().out
    assert run_eval(["fid", "--real", str(tmp_path / "nope"), "--fake", str(fake), "--dry-run"]) == 2


WORKER = """
import argparse, sys
from difftune.commands.eval_fid import add_parser as add_eval_parser
parser = argparse.ArgumentParser()
add_eval_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
raise SystemExit(args.func(args))
"""


def test_two_processes_match_one(dit_dir, folders, classifier_path, tmp_path) -> None:
    """Real gloo processes (docs/architecture.md, "Known traps"): same FID and same samples as one process.

    The 40 reference images and the 15 samples are split between the two ranks (item i on rank i mod 2).
    """
    real, _ = folders
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    common = [
        "eval",
        "fid",
        "--real",
        str(real),
        "--checkpoint",
        str(dit_dir),
        "--num-per-class",
        "3",
        "--steps",
        "2",
        "--features",
        f"digits:{classifier_path}",
        "--kid",
        "--kid-subsets",
        "5",
        "--kid-subset-size",
        "10",
        "--batch-size",
        "4",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        *torchrun_command(worker),
        *common,
        "--out-json",
        str(tmp_path / "ddp.json"),
        "--export-npz",
        str(tmp_path / "ddp.npz"),
    ]
    run_torchrun(cmd, env)
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["num_processes"] == 2

    assert (
        run_eval(
            [*common[1:], "--out-json", str(tmp_path / "one.json"), "--export-npz", str(tmp_path / "one.npz")]
        )
        == 0
    )
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["num_processes"] == 1
    for key in ("fid", "kid", "kid_std"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-6), key
    with np.load(tmp_path / "ddp.npz") as a, np.load(tmp_path / "one.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_sample_folders_compose_with_eval_fid(dit_dir, classifier_path, folders, tmp_path, capsys) -> None:
    """``eval fid --fake`` scores exactly the images ``sample`` wrote (not the grid); ``sample`` never
    mixes its images with earlier ones."""
    from difftune.cli import main

    real, _ = folders
    out = tmp_path / "samples"
    sample = [
        "sample",
        "--model",
        str(dit_dir),
        "--labels",
        "0,1",
        "--per-label",
        "2",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    assert main(sample) == 0
    assert (out / "grid.png").is_file()
    result = tmp_path / "r.json"
    assert (
        run_eval(
            [
                "fid",
                "--real",
                str(real),
                "--fake",
                str(out),
                "--features",
                f"digits:{classifier_path}",
                "--out-json",
                str(result),
            ]
        )
        == 0
    )
    assert json.loads(result.read_text())["num_fake"] == 4  # 4 samples, the grid left out
    capsys.readouterr()

    assert main(sample) == 2  # the same folder again: refused, nothing mixed in
    assert "--overwrite" in capsys.readouterr().err
    assert main([*sample, "--per-label", "1", "--overwrite"]) == 0
    assert len(list(out.glob("0*.png"))) == 2  # only the new run's images remain

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "photo.png").write_bytes((out / "grid.png").read_bytes())
    assert main([*sample[:-1], str(foreign), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err and (foreign / "photo.png").is_file()


def test_checkpoint_with_domain_guidance_samples_as_difftune_sample_does(
    dit_dir, classifier_path, folders, tmp_path, capsys
) -> None:
    from difftune.backbones import load_pretrained
    from difftune.commands.sample import sample_to_folder
    from difftune.config.sampling import SamplingSpec
    from difftune.testing.models import save_pipeline_dir, tiny_dit

    real, fake = folders
    pretrained = save_pipeline_dir(tmp_path / "pretrained", tiny_dit(seed=3), "transformer")
    npz = tmp_path / "guided.npz"
    sampling = ["--num-per-class", "2", "--labels", "0,1", "--scheduler", "DDIMScheduler", "--steps", "3"]
    sampling += ["--guidance-scale", "2.0", "--domain-guidance", str(pretrained)]
    features = ["--features", f"digits:{classifier_path}"]
    args = ["fid", "--real", str(real), "--checkpoint", str(dit_dir), *sampling, *features]
    assert run_eval([*args, "--export-npz", str(npz)]) == 0
    with np.load(npz) as data:
        arr = data["arr_0"]
    folder = tmp_path / "sampled"
    guide = load_pretrained(str(pretrained)).backbone
    spec = SamplingSpec("DDIMScheduler", steps=3, guidance_scale=2.0)
    sample_to_folder(load_pretrained(str(dit_dir)), [0, 1], 2, folder, spec, batch_size=4, guide=guide)
    (folder / "grid.png").unlink()
    np.testing.assert_array_equal(arr, (read_folder(folder).permute(0, 2, 3, 1).numpy() * 255).round())
    capsys.readouterr()
    assert (
        run_eval(
            ["fid", "--real", str(real), "--fake", str(fake), "--domain-guidance", str(pretrained), *features]
        )
        == 2
    )
    assert "--domain-guidance only apply with --checkpoint" in capsys.readouterr().err
