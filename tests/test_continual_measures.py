"""The scores of a task sequence (``measures.json``): the summary's formulas on hand-computed matrices,
partial matrices, the file's round trip and refusals, and the heat map."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from difftune.continual.heatmap import heat_map_png, write_heat_map
from difftune.continual.measures import ScoreMatrix, summarise
from difftune.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def three_stages() -> ScoreMatrix:
    """The source and three tasks a, b, c, each learned by one stage.

    Rows (after stage) × columns (task): the source's score drifts 10 → 12 → 15 → 14; task a is best
    after stage b (38) and ends at 42; task b ends better (29) than right after it was learned (30).
    """
    return ScoreMatrix(
        tasks=["source", "a", "b", "c"],
        stages=["source", "a", "b", "c"],
        stage_dirs=[None, "stage1-a", "stage2-b", "stage3-c"],
        scores=[
            [10.0, None, None, None],
            [12.0, 40.0, None, None],
            [15.0, 38.0, 30.0, None],
            [14.0, 42.0, 29.0, 20.0],
        ],
        before=[None, 50.0, 45.0, 35.0],
        baseline=[None, 50.0, 60.0, 55.0],
    )


def test_the_summary_of_three_stages() -> None:
    s = summarise(three_stages())
    # average per row i >= 1 over tasks 1..i: 40; (38 + 30) / 2; (42 + 29 + 20) / 3
    assert s["average"] == [40.0, 34.0, 30.3333]
    assert s["final_average"] == 30.3333
    # a: 42 - min(40, 38) = 4; b: 29 - min(30) = -1 (it got better); c is the last task: none
    assert s["forgetting"] == {"a": 4.0, "b": -1.0}
    assert s["average_forgetting"] == 1.5
    # 14 - min(10, 12, 15)
    assert s["source_forgetting"] == 4.0
    # ((40 - 42) + (30 - 29)) / 2
    assert s["bwt"] == -0.5
    # task b: 60 - 45; task c: 55 - 35 (task a's stage starts from the source: left out)
    assert s["fwt"] == 17.5
    assert s["source"] == 14.0
    assert all(isinstance(v, float) for v in (s["final_average"], s["bwt"], s["fwt"], s["source"]))


def test_a_score_not_measured_is_left_out_of_the_means() -> None:
    m = three_stages()
    m.before[2] = None  # task b's starting score was not measured
    m.scores[3][2] = None  # nor task b's last score
    s = summarise(m)
    assert s["average"][-1] == 31.0  # (42 + 20) / 2
    assert s["forgetting"] == {"a": 4.0, "b": None}
    assert s["average_forgetting"] == 4.0
    assert s["bwt"] == -2.0  # task a only
    assert s["fwt"] == 20.0  # task c only


def test_a_running_sequence_has_a_partial_matrix() -> None:
    full = three_stages()
    m = ScoreMatrix(
        tasks=full.tasks[:3],
        stages=full.stages[:2],
        stage_dirs=full.stage_dirs[:2],
        scores=[row[:3] for row in full.scores[:2]],
        before=full.before[:3],
        baseline=full.baseline[:3],
    )
    assert summarise(m) == {
        "average": [40.0],
        "final_average": 40.0,
        "forgetting": {},
        "average_forgetting": None,
        "source_forgetting": 2.0,  # 12 - 10
        "bwt": None,
        "fwt": None,  # task b's stage has not run
        "source": 12.0,
    }
    assert heat_map_png(m).startswith(PNG_SIGNATURE)


def test_the_source_model_alone() -> None:
    m = ScoreMatrix(["source", "a"], ["source"], [None], [[10.0, None]], [None, None], [None, None])
    assert summarise(m) == {
        "average": [],
        "final_average": None,
        "forgetting": {},
        "average_forgetting": None,
        "source_forgetting": None,
        "bwt": None,
        "fwt": None,
        "source": 10.0,
    }


def test_the_file_round_trips(tmp_path: Path) -> None:
    m = three_stages()
    path = tmp_path / "seq" / "measures.json"
    m.write(path)
    d = json.loads(path.read_text())
    assert d["kind"] == "continual_measures" and d["metric"] == "fid"
    assert d["scores"][1] == [12.0, 40.0, None, None]
    assert d["summary"]["fwt"] == 17.5
    assert ScoreMatrix.read(path) == m
    assert [p.name for p in path.parent.iterdir()] == ["measures.json"]  # no temporary left


def test_integers_are_read_as_floats() -> None:
    d = three_stages().to_dict()
    d["scores"][0][0] = 10
    m = ScoreMatrix.from_dict(d)
    assert m.scores[0][0] == 10.0 and isinstance(m.scores[0][0], float)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d["scores"][2].pop(), r"scores\[2\] has 3 entries, expected 4"),
        (lambda d: d["scores"].pop(), "scores has 3 entries, expected 4"),
        (lambda d: d.update(kind="forgetting"), "its kind is 'forgetting', not 'continual_measures'"),
        (lambda d: d["before"].append(1.0), "before has 5 entries, expected 4"),
        (lambda d: d["baseline"].__setitem__(1, "50"), "baseline is not a list of numbers or nulls"),
        (lambda d: d["stage_dirs"].pop(), "stage_dirs has 3 entries, expected 4"),
        (lambda d: d["tasks"].pop(), "it has 4 stage"),
        (lambda d: d["tasks"].__setitem__(2, "a"), "repeat a name"),
    ],
)
def test_a_bad_file_is_refused(change, problem: str) -> None:
    d = three_stages().to_dict()
    change(d)
    with pytest.raises(UserError, match=problem) as refused:
        ScoreMatrix.from_dict(d, source="seq/measures.json")
    message = str(refused.value)
    assert message.startswith("seq/measures.json is not valid continual measures: ")
    assert "fix the file" in message and "\n" not in message


def test_a_missing_or_damaged_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot be read"):
        ScoreMatrix.read(tmp_path / "measures.json")
    (tmp_path / "measures.json").write_text('{"kind": ')
    with pytest.raises(UserError, match="is not valid JSON"):
        ScoreMatrix.read(tmp_path / "measures.json")


@pytest.mark.parametrize(
    "m",
    [
        three_stages(),
        ScoreMatrix(["source"], ["source"], [None], [[12.5]], [None], [None]),
        ScoreMatrix(["source"], ["source"], [None], [[None]], [None], [None]),
    ],
    ids=["3-stages", "1x1", "1x1-not-measured"],
)
def test_the_heat_map_is_a_png(m: ScoreMatrix, tmp_path: Path) -> None:
    png = heat_map_png(m)
    assert png.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width > 0 and image.height > 0
    write_heat_map(m, tmp_path / "heat.png")
    assert (tmp_path / "heat.png").read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]


def test_the_heat_map_grows_with_the_matrix() -> None:
    small = Image.open(
        io.BytesIO(heat_map_png(ScoreMatrix(["source"], ["source"], [None], [[1.0]], [None], [None])))
    )
    large = Image.open(io.BytesIO(heat_map_png(three_stages())))
    assert large.width > small.width and large.height > small.height
