"""The report page rendered by a real browser: headless Chromium (Debian's ``chromium`` package).

Slow (a browser starts) and skipped where Chromium is not installed: ``apt-get install chromium``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftune.cli import main
from test_report import fake_run
from test_report_sequence import sequence

pytestmark = pytest.mark.slow
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)


def screenshot(page: Path, out: Path, height: int) -> np.ndarray:
    """The page as headless Chromium draws it, ``(height, 1200, 3)`` uint8."""
    assert CHROMIUM is not None
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size=1200,{height}",
            f"--screenshot={out}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return np.asarray(Image.open(out).convert("RGB"))


def coloured_share(pixels: np.ndarray) -> float:
    """The share of pixels that are neither grey nor white: plotted lines, heat-map cells, sample grids
    (the page's own text and rules are grey)."""
    spread = pixels.max(axis=2).astype(int) - pixels.min(axis=2).astype(int)
    return float((spread > 40).mean())


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_the_report_renders_with_its_figures(tmp_path: Path) -> None:
    seq = sequence(tmp_path / "digits")
    run = fake_run(tmp_path / "plain", grids=2)
    assert main(["report", str(run), str(seq), "--out", str(tmp_path / "report.html")]) == 0
    pixels = screenshot(tmp_path / "report.html", tmp_path / "page.png", height=6000)
    assert pixels.shape == (6000, 1200, 3)
    rows = np.nonzero((pixels < 250).any(axis=(1, 2)))[0]
    assert rows.size and rows[-1] - rows[0] > 2000  # a long page was drawn, not an error line
    # the same page with its images taken out keeps only its coloured notes: the figures were decoded
    # and drawn when the page has several times as much colour
    html = (tmp_path / "report.html").read_text()
    bare = tmp_path / "bare.html"
    bare.write_text(html.replace('src="data:image/png;base64,', 'data-src="'))
    assert coloured_share(pixels) > 3 * coloured_share(screenshot(bare, tmp_path / "bare.png", height=6000))
