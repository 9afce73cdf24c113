"""``difftune report`` of a task sequence folder: its stages' runs, the heat map of its scores and the
summary of forgetting and transfer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from difftune.cli import main
from difftune.continual.measures import ScoreMatrix
from difftune.errors import UserError
from difftune.report import check_path, load_report, render_page
from test_report import fake_run, parse


def sequence(folder: Path, stages_run: int = 2) -> Path:
    """A sequence folder of two tasks (2-3, then 4-5) whose ``stages_run`` first stages have run folders."""
    folder.mkdir(parents=True)
    ScoreMatrix(
        tasks=["source", "2-3", "4-5"],
        stages=["source", "2-3", "4-5"],
        stage_dirs=[None, "stage1-2-3", "stage2-4-5"],
        scores=[[10.0, None, None], [12.0, 40.0, None], [13.5, 44.0, 30.0]],
        before=[None, 50.0, 45.0],
        baseline=[None, 50.0, 62.0],
    ).write(folder / "measures.json")
    for name in ("stage1-2-3", "stage2-4-5")[:stages_run]:
        fake_run(folder / name)
    return folder


def test_the_page_of_a_sequence(tmp_path: Path) -> None:
    seq = sequence(tmp_path / "digits")
    assert main(["report", str(seq)]) == 0
    html = (seq / "report.html").read_text()
    page = parse(html)
    text = "".join(page.text)
    assert "Task sequence: digits" in text
    assert {"sequence-1", "fig-sequence-1", "sequence-table-1"} <= page.ids
    assert (
        '<img id="fig-sequence-1" class="figure" alt="scores of digits" src="data:image/png;base64,' in html
    )
    table = html.split('<table id="sequence-table-1">')[1].split("</table>")[0]
    cells = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", table)
    assert cells == [
        ("average FID after 2-3", "40.0"),
        ("average FID after 4-5", "37.0"),  # (44 + 30) / 2
        ("forgetting of 2-3", "4.0"),  # 44 - 40
        ("average forgetting", "4.0"),
        ("source forgetting", "3.5"),  # 13.5 - min(10, 12)
        ("FID on the source, now", "13.5"),
        ("BWT (backward transfer)", "-4.0"),  # 40 - 44
        ("FWT (forward transfer)", "17.0"),  # 62 - 45
    ]
    assert "positive means later stages helped earlier tasks" in text
    # both stages' runs are in the summary table, the figures and the sample grids
    summary = html.split('<table id="summary-table">')[1].split("</table>")[0]
    assert "digits/stage1-2-3" in summary and "digits/stage2-4-5" in summary
    assert {"fig-train-loss", "fig-eval-loss"} <= page.ids


def test_a_sequence_beside_a_run_and_a_stage_not_run_yet(tmp_path: Path) -> None:
    seq = sequence(tmp_path / "digits", stages_run=1)
    run = fake_run(tmp_path / "plain")
    runs, sequences = load_report([run, seq])
    assert [r.name for r in runs] == ["plain", "digits/stage1-2-3"]
    assert [s.name for s in sequences] == ["digits"] and sequences[0].runs == ["digits/stage1-2-3"]
    assert sequences[0].notes == [
        "stage 2 (4-5): stage2-4-5 holds no metrics.jsonl (yet); its run is not shown"
    ]
    page = parse(render_page(runs, sequences=sequences))
    assert {"sequence-1", "fig-sequence-1", "summary-table"} <= page.ids
    assert "stage2-4-5 holds no metrics.jsonl" in "".join(page.text)


def test_a_sequence_without_stage_runs_still_has_its_section(tmp_path: Path) -> None:
    seq = sequence(tmp_path / "digits", stages_run=0)
    out = tmp_path / "page.html"
    assert main(["report", str(seq), "--out", str(out)]) == 0
    page = parse(out.read_text())
    assert "fig-sequence-1" in page.ids and "summary-table" not in page.ids


def test_a_folder_with_bad_measures_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seq = sequence(tmp_path / "digits")
    d = json.loads((seq / "measures.json").read_text())
    d["scores"][1].pop()
    (seq / "measures.json").write_text(json.dumps(d))
    problem = f"{seq} is not a difftune run folder: it has no metrics.jsonl"
    with pytest.raises(UserError, match=re.escape(problem) + r".*scores\[1\] has 2 entries, expected 3"):
        check_path(seq)
    assert main(["report", str(seq)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (seq / "report.html").exists()
    # a run folder that happens to hold another measures.json is still a run
    run = fake_run(tmp_path / "run")
    (run / "measures.json").write_text("{}")
    assert check_path(run) is None
    (run / "config.yaml").unlink()
    assert check_path(run) is None
