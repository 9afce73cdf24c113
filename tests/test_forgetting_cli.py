"""``difftune forgetting`` end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import save_pipeline_dir, tiny_dit
from difftune.cli import main
from difftune.data.builtin import load_sklearn_digits
from difftune.metrics import save_classifier, train_digit_classifier


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    images, labels = load_sklearn_digits()
    heldout = tmp_path / "heldout"
    for k in (0, 1):
        (heldout / f"class{k}").mkdir(parents=True)
        for i, image in enumerate(images[labels == k][:6]):
            Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(
                heldout / f"class{k}" / f"{i}.png"
            )
    classifier = tmp_path / "clf.safetensors"
    save_classifier(train_digit_classifier(images, labels, steps=30), classifier)
    return {
        "finetuned": save_pipeline_dir(tmp_path / "ft", tiny_dit(seed=1), "transformer"),
        "pretrained": save_pipeline_dir(tmp_path / "pre", tiny_dit(seed=2), "transformer"),
        "heldout": heldout,
        "classifier": classifier,
        "out": tmp_path / "out",
    }


def _args(s: dict[str, Path], *extra: str) -> list[str]:
    return [
        "forgetting",
        "--finetuned",
        str(s["finetuned"]),
        "--pretrained",
        str(s["pretrained"]),
        "--heldout",
        str(s["heldout"]),
        "--features",
        f"digits:{s['classifier']}",
        "--num-per-class",
        "3",
        "--steps",
        "3",
        "--gap-bins",
        "4",
        "--gap-draws",
        "1",
        "--out",
        str(s["out"]),
        *extra,
    ]


def test_forgetting_probes_write_json_and_plots(setup: dict[str, Path]) -> None:
    assert main(_args(setup, "--fractions", "0,0.5,1")) == 0
    swap = json.loads((setup["out"] / "forgetting_swap.json").read_text())
    assert [r["fraction"] for r in swap["rows"]] == [0.0, 0.5, 1.0]
    assert all(r["fid"] >= 0 for r in swap["rows"])
    gap = json.loads((setup["out"] / "forgetting_gap.json").read_text())
    assert [(r["t_low"], r["t_high"]) for r in gap["rows"]] == [(0, 249), (250, 499), (500, 749), (750, 999)]
    for r in gap["rows"]:
        assert r["gap"] == pytest.approx(r["pretrained"] - r["finetuned"])
    assert (setup["out"] / "forgetting_swap.png").is_file() and (
        setup["out"] / "forgetting_gap.png"
    ).is_file()


def test_gap_in_log_snr_bins_covers_the_chain_least_noise_first(setup: dict[str, Path]) -> None:
    assert main(_args(setup, "--fractions", "0,1", "--gap-axis", "log_snr")) == 0
    rows = json.loads((setup["out"] / "forgetting_gap.json").read_text())["rows"]
    # DDPM linear: log-SNR from 9.2 down to -10.1, so all 10 bins of the shared edges (--gap-bins unread)
    assert len(rows) == 10 and rows[0]["t_low"] == 0 and rows[-1]["t_high"] == 999
    assert [r["log_snr_high"] for r in rows] == [None, 8.0, 6.0, 4.0, 2.0, 0.0, -2.0, -4.0, -6.0, -8.0]
    assert all(r["log_snr_mid"] < (r["log_snr_high"] or 99) for r in rows)


def test_same_model_has_no_gap(setup: dict[str, Path]) -> None:
    args = _args(setup, "--fractions", "0,1")
    args[args.index("--pretrained") + 1] = str(setup["finetuned"])
    assert main(args) == 0
    gap = json.loads((setup["out"] / "forgetting_gap.json").read_text())
    # the null-label branch differs from the conditional one, so the gap is small but not exactly zero
    for r in gap["rows"]:
        assert abs(r["gap"]) < 0.1 * r["finetuned"] + 1e-6


def test_forgetting_dry_run_and_bad_input(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(setup, "--dry-run")) == 0
    assert "would probe" in capsys.readouterr().out
    assert main(_args(setup, "--fractions", "0,2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difftune: error:") and "--fractions" in err[0]
    args = _args(setup)
    args[args.index("--heldout") + 1] = str(setup["out"] / "missing")
    assert main(args) == 2
    for bad, flag in (["--scheduler", "NoSuchScheduler"], "--scheduler"), (["--steps", "0"], "--steps"):
        capsys.readouterr()
        assert main(_args(setup, *bad, "--dry-run")) == 2
        assert flag in capsys.readouterr().err
