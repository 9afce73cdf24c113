"""ControlNet condition fidelity: the Canny annotator, the fidelity scores, convergence analysis, the log
and ``difftune convergence``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from difftune.cli import main
from difftune.control import (
    CannyAnnotator,
    ConvergenceSummary,
    append_fidelity,
    build_annotator,
    changepoint_step,
    condition_fidelity,
    curve_area,
    edge_f1,
    per_sample_fidelity,
    read_fidelity,
    sudden_convergence_step,
    summarise,
)
from difftune.control.annotators import to_uint8_hwc
from difftune.errors import UserError


def white_square(size: int = 32, lo: int = 8, hi: int = 24) -> torch.Tensor:
    """A (1, 3, size, size) image in [-1, 1]: white on rows and columns lo..hi-1, black elsewhere."""
    image = -torch.ones(1, 3, size, size)
    image[:, :, lo:hi, lo:hi] = 1.0
    return image


def outline(size: int, lo: int, hi: int, shift: int = 0) -> torch.Tensor:
    """A (1, 3, size, size) binary map: the outline of the box lo..hi (inclusive), moved right by shift."""
    box = torch.zeros(size, size)
    box[lo, lo + shift : hi + shift + 1] = 1
    box[hi, lo + shift : hi + shift + 1] = 1
    box[lo : hi + 1, lo + shift] = 1
    box[lo : hi + 1, hi + shift] = 1
    return box.expand(1, 3, size, size).clone()


# --- annotators ---


def test_canny_matches_opencv_and_finds_the_square_border() -> None:
    image = white_square()
    edges = CannyAnnotator()(image)
    assert edges.shape == (1, 3, 32, 32) and edges.dtype == torch.float32
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(edges[:, 0], edges[:, 1]) and torch.equal(edges[:, 0], edges[:, 2])
    direct = cv2.Canny(to_uint8_hwc(image)[0], 100, 200) > 0
    assert np.array_equal(edges[0, 0].numpy() > 0, direct)
    rows, cols = np.nonzero(direct)
    # the border lies between pixels 7|8 and 23|24: every edge pixel is next to it, none far inside or out
    near_border = (rows >= 7) & (rows <= 24) & (cols >= 7) & (cols <= 24)
    inside = (rows >= 9) & (rows <= 22) & (cols >= 9) & (cols <= 22)
    assert len(rows) > 0 and near_border.all() and not inside.any()
    for side in (rows <= 8, rows >= 23, cols <= 8, cols >= 23):  # every side of the square is found
        assert side.sum() >= 10


def test_canny_grayscale_is_replicated_and_a_flat_image_has_no_edges() -> None:
    color = white_square()
    assert torch.equal(CannyAnnotator()(color[:, :1]), CannyAnnotator()(color))
    assert CannyAnnotator()(torch.zeros(2, 3, 16, 16)).sum() == 0


def test_images_become_uint8_as_pil_would() -> None:
    image = torch.tensor([-1.0, 1.0, 0.0, 2.0, -3.0, 0.5]).view(1, 1, 1, 6)
    assert to_uint8_hwc(image)[0, 0, :, 0].tolist() == [0, 255, 128, 255, 0, 191]
    with pytest.raises(UserError, match="N, 1 or 3"):
        to_uint8_hwc(torch.zeros(1, 2, 4, 4))


def test_build_annotator_and_its_record() -> None:
    canny = build_annotator("canny", low=50, high=150)
    assert canny.record() == {"name": "canny", "low": 50, "high": 150}
    assert CannyAnnotator().record() == {"name": "canny", "low": 100, "high": 200}
    with pytest.raises(UserError, match="unknown annotator 'hed'; valid: canny"):
        build_annotator("hed")
    with pytest.raises(UserError, match="low <= high"):
        CannyAnnotator(low=200, high=100)
    with pytest.raises(UserError, match="annotator 'canny'"):
        build_annotator("canny", sigma=2)


# --- fidelity ---


def test_edge_f1_known_values() -> None:
    square = outline(16, 4, 11)  # 28 edge pixels
    assert edge_f1(square, square, 0).item() == 1.0
    shifted = outline(16, 4, 11, shift=1)
    assert edge_f1(shifted, square, 1).item() == 1.0
    # tolerance 0: only the 7 + 7 pixels shared by the top and bottom rows match; P = R = 14/28
    assert edge_f1(shifted, square, 0).item() == pytest.approx(0.5)
    empty = torch.zeros_like(square)
    assert edge_f1(empty, empty).item() == 1.0
    assert edge_f1(empty, square).item() == 0.0 and edge_f1(square, empty).item() == 0.0
    line, half = torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    line[..., 8, :8] = 1
    half[..., 8, :4] = 1
    assert edge_f1(half, line, 0).item() == pytest.approx(2 / 3)  # precision 1, recall 1/2
    with pytest.raises(UserError, match=">= 0"):
        edge_f1(square, square, -1)


def test_fidelity_of_identical_and_different_controls() -> None:
    control = torch.cat([outline(16, 4, 11), outline(16, 2, 13)])
    scores = condition_fidelity(control, control)
    assert scores["mse"] == 0.0 and scores["ssim"] == pytest.approx(1.0)
    assert scores["dssim"] == pytest.approx(0.0, abs=1e-6) and scores["edge_f1"] == 1.0
    half = torch.zeros(1, 3, 16, 16)
    half[..., :8] = 1
    assert condition_fidelity(half, torch.zeros_like(half))["mse"] == pytest.approx(0.5)
    per_sample = per_sample_fidelity(torch.cat([control[:1], torch.zeros_like(control[:1])]), control)
    assert per_sample["edge_f1"].tolist() == [1.0, 0.0] and per_sample["mse"][0] == 0.0
    assert all(values.shape == (2,) for values in per_sample.values())
    assert torch.allclose(per_sample["dssim"], (1 - per_sample["ssim"]) / 2)


def test_fidelity_refuses_mismatched_shapes() -> None:
    with pytest.raises(UserError, match=r"\(1, 3, 16, 16\) and input control \(1, 3, 8, 8\) differ"):
        condition_fidelity(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 8, 8))
    with pytest.raises(UserError, match="must be \\(N, C, H, W\\)"):
        condition_fidelity(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))


# --- convergence ---

STEPS = [0, 100, 200, 300, 400, 500]


def test_sudden_convergence_step() -> None:
    assert sudden_convergence_step(STEPS, [0.9, 0.8, 0.2, 0.1, 0.1, 0.1], 0.5) == 200
    assert sudden_convergence_step(STEPS, [0.9, 0.9, 0.8, 0.9, 0.7, 0.6], 0.5) is None  # never
    assert sudden_convergence_step(STEPS, [0.9, 0.2, 0.1, 0.8, 0.9, 0.9], 0.5) is None  # re-diverged
    assert sudden_convergence_step(STEPS, [0.9, 0.2, 0.8, 0.3, 0.2, 0.5], 0.5) == 300  # dip, then for good
    assert sudden_convergence_step(STEPS, [1.0, 0.8, 0.6, 0.4, 0.2, 0.0], 0.5) == 300  # monotone
    assert sudden_convergence_step([7], [0.1], 0.5) == 7
    with pytest.raises(UserError, match="finite"):
        sudden_convergence_step([7], [0.1], math.nan)


def test_changepoint_step() -> None:
    assert changepoint_step(STEPS, [0.9, 0.9, 0.2, 0.2, 0.2, 0.2]) == 200
    assert changepoint_step(STEPS, [0.9, 0.8, 0.9, 0.2, 0.1, 0.15]) == 300
    assert changepoint_step(STEPS, [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]) == 300  # linear: split in the middle
    assert changepoint_step(STEPS, [0.1, 0.1, 0.1, 0.8, 0.9, 0.9]) is None  # diverged: the level rose
    assert changepoint_step(STEPS, [0.3] * 6) is None  # flat
    assert changepoint_step([7], [0.1]) is None


def test_curve_area_and_summary() -> None:
    assert curve_area([0, 10, 30], [1.0, 0.0, 0.0]) == pytest.approx(5 / 30)  # trapezoids, uneven steps
    assert curve_area([0, 100], [0.4, 0.2]) == pytest.approx(0.3)
    assert curve_area([5], [0.7]) == 0.7
    summary = summarise(STEPS, [0.9, 0.9, 0.2, 0.2, 0.2, 0.1], 0.5)
    assert summary == ConvergenceSummary(step=200, changepoint=200, area=pytest.approx(0.4), final=0.1)


@pytest.mark.parametrize(
    "steps,values,message",
    [
        ([0, 1], [0.1], "2 steps and 1 values"),
        ([], [], "empty"),
        ([0, 2, 2], [0.1, 0.2, 0.3], "strictly increasing, got 2 then 2"),
        ([0, 1], [0.1, math.inf], "step 1 is inf"),
        ([0, 1], [math.nan, 0.1], "step 0 is nan"),
    ],
)
def test_bad_curves_are_refused(steps: list[int], values: list[float], message: str) -> None:
    for analyse in (changepoint_step, curve_area, lambda s, v: sudden_convergence_step(s, v, 0.5)):
        with pytest.raises(UserError, match=message):
            analyse(steps, values)


# --- the log ---


def test_read_fidelity_ignores_a_torn_line_and_keeps_the_last_of_a_step(tmp_path: Path) -> None:
    for step, f1 in [(100, 0.1), (200, 0.2), (300, 0.3), (200, 0.25)]:  # resumed after step 300
        append_fidelity(tmp_path, step, {"edge_f1": f1, "mse": 0.5})
    log = tmp_path / "fidelity.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 400, "edge_f1": 0.')  # a crash mid-write
    assert [(r["step"], r["edge_f1"]) for r in read_fidelity(tmp_path)] == [
        (100, 0.1),
        (200, 0.25),
        (300, 0.3),
    ]
    append_fidelity(tmp_path, 400, {"edge_f1": 0.4})  # the torn line is dropped, not glued onto
    assert [r["step"] for r in read_fidelity(tmp_path)] == [100, 200, 300, 400]
    assert all(json.loads(line) for line in log.read_text().splitlines())


def test_a_whole_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    (tmp_path / "fidelity.jsonl").write_text('{"step": 1, "mse": 0.5}')
    assert read_fidelity(tmp_path) == [{"step": 1, "mse": 0.5}]
    append_fidelity(tmp_path, 2, {"mse": 0.25})
    assert read_fidelity(tmp_path) == [{"step": 1, "mse": 0.5}, {"step": 2, "mse": 0.25}]


def test_damaged_or_missing_logs_are_refused(tmp_path: Path) -> None:
    (tmp_path / "fidelity.jsonl").write_text('{"step": 1, "mse": 0.5}\n{"step": 2, "ms\n{"step": 3}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_fidelity(tmp_path)
    (tmp_path / "fidelity.jsonl").write_text('{"mse": 0.5}\n')
    with pytest.raises(UserError, match="line 1 is not an object with an integer 'step'"):
        read_fidelity(tmp_path)
    with pytest.raises(UserError, match="has no fidelity.jsonl; was it trained with validation prompts"):
        read_fidelity(tmp_path / "..")
    with pytest.raises(UserError, match="is not a directory"):
        read_fidelity(tmp_path / "nowhere")


# --- difftune convergence ---


def make_run(path: Path, f1_curve: list[float], with_f1: bool = True) -> Path:
    for step, f1 in zip(STEPS, f1_curve, strict=True):
        scores = {"mse": (1 - f1) / 10, "ssim": f1, "dssim": (1 - f1) / 2}
        append_fidelity(path, step, {**scores, "edge_f1": f1} if with_f1 else scores)
    return path


def test_cli_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fast = make_run(tmp_path / "fast", [0.1, 0.2, 0.8, 0.9, 0.9, 0.9])
    slow = make_run(tmp_path / "slow", [0.1, 0.1, 0.2, 0.1, 0.2, 0.3])
    plot = tmp_path / "out" / "curves.png"
    assert main(["convergence", str(fast), str(slow), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "1-edge_f1" in out and "converged at" in out and "change point" in out
    fast_row = next(line for line in out.splitlines() if line.startswith(str(fast)))
    assert fast_row.split()[1:4] == ["1-edge_f1", "200", "200"] and fast_row.split()[-1] == "0.1000"
    slow_row = next(line for line in out.splitlines() if line.startswith(str(slow)))
    assert slow_row.split()[2] == "-"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        image.verify()
    assert [p.name for p in plot.parent.iterdir()] == ["curves.png"]  # no temporary left behind

    assert main(["convergence", str(fast), "--metric", "mse", "--threshold", "0.05", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["metric"] == "mse" and row["threshold"] == 0.05 and row["step"] == 200
    assert row["final"] == pytest.approx(0.01)


def test_cli_defaults_to_mse_without_edge_f1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", [0.1, 0.2, 0.8, 0.9, 0.9, 0.9], with_f1=False)
    assert main(["convergence", str(run), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["metric"] == "mse" and row["threshold"] == 0.05
    assert main(["convergence", str(run), "--dry-run", "--plot", str(tmp_path / "p.png")]) == 0
    assert "would summarise 1 run(s) on mse" in capsys.readouterr().out
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["{empty}"], "has no fidelity.jsonl; was it trained with validation prompts and conditions"),
        (["{missing}"], "is not a directory"),
        (["{mse_only}", "--metric", "edge_f1"], "step 0 has no 'edge_f1'"),
        (["{mse_only}", "--threshold", "nan"], "threshold must be finite"),
        (["{mse_only}", "--plot", "{empty}"], "is a directory"),
    ],
)
def test_cli_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "empty").mkdir()
    make_run(tmp_path / "mse_only", [0.5] * 6, with_f1=False)
    paths = {name: str(tmp_path / name) for name in ("empty", "missing", "mse_only")}
    assert main(["convergence", *(arg.format(**paths) for arg in argv)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difftune: error:") and message in lines[0]
