"""``difftune report``: the HTML page of a run folder (and of several), on tiny runs of the test DiT."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from conftest import save_pipeline_dir, tiny_dit
from difftune.backbones import load_pretrained
from difftune.bank import generate_bank
from difftune.cli import main
from difftune.errors import UserError
from difftune.report import load_runs, render_page, write_report
from difftune.report.run import evenly_spaced
from difftune.training.loop import Trainer
from test_training import make_cfg

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr"}
FEATURES = "train.evaluation.features=test_training_evaluation:mean_pixels"
DDPM = {
    "_class_name": "DDPMScheduler",
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


class Page(HTMLParser):
    """Parses a page, checking that every tag closes in order; collects the images and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[dict[str, str]] = []
        self.ids: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if "id" in attributes:
            self.ids.add(attributes["id"])
        if tag == "img":
            self.images.append(attributes)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    assert page.stack == [], f"unclosed tags {page.stack}"
    for image in page.images:
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix), image["src"][:40]
        png = Image.open(io.BytesIO(base64.b64decode(image["src"][len(prefix) :], validate=True)))
        assert png.format == "PNG"
        png.verify()
    return page


def alts(page: Page) -> list[str]:
    return [image.get("alt", "") for image in page.images]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny runs from one DiT: Diff-Tuning with every evaluation, best/ and grids; plain fine-tuning
    with the held-out target loss only."""
    root = tmp_path_factory.mktemp("report")
    dit = save_pipeline_dir(root / "dit", tiny_dit(), "transformer")
    generate_bank(
        load_pretrained(str(dit)), make_cfg(dit, root / "unused", root / "bank").bank, progress=False
    )
    difftune = root / "difftune"
    Trainer(
        make_cfg(
            dit,
            difftune,
            root / "bank",
            "train.eval_every=2",
            "train.evaluation.bins=3",
            "train.evaluation.holdout=5",
            "train.evaluation.bank_holdout=4",
            "train.evaluation.samples=4",
            FEATURES,
            "train.keep_best=fid",
            "train.sample_every=2",
            "train.sampling.steps=2",
        )
    ).train()
    plain = root / "plain"
    Trainer(
        make_cfg(dit, plain, None, "train.eval_every=2", "train.evaluation.holdout=4", "train.max_steps=2")
    ).train()
    return {"difftune": difftune, "plain": plain}


def test_the_page_of_one_run_holds_every_figure(runs: dict[str, Path]) -> None:
    run = runs["difftune"]
    assert main(["report", str(run)]) == 0
    page = parse((run / "report.html").read_text())
    assert {f"fig-{name}" for name in ("train-loss", "eval-loss", "eval-profile", "densities")} <= page.ids
    assert {"fig-scores", "fig-pareto", "summary-table"} <= page.ids
    grids = sorted((run / "samples").glob("step-*.png"))
    assert len(grids) == 2
    assert [a for a in alts(page) if a.startswith("samples of")] == [
        "samples of difftune at step 2",
        "samples of difftune at step 4",
    ]
    text = "".join(page.text)
    best = json.loads((run / "best" / "best.json").read_text())
    assert f"at step {best['step']}" in text
    assert "power_up(s=1)" in text and "power_down(s=1)" in text
    assert "ψ/ξ not shown" not in text


def test_a_comparison_page_names_both_runs(runs: dict[str, Path], tmp_path: Path) -> None:
    out = write_report([runs["difftune"], runs["plain"]], tmp_path / "compare.html")
    page = parse(out.read_text())
    text = "".join(page.text)
    assert "difftune" in text and "plain" in text
    assert {"fig-train-loss", "fig-eval-loss", "fig-densities", "fig-pareto"} <= page.ids
    assert "no sample grids" in text  # the plain run drew none
    assert len(re.findall(r"<tr>", out.read_text())) == 3  # the header and one row per run


def test_runs_with_the_same_folder_name_are_told_apart(runs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "difftune").symlink_to(runs["plain"], target_is_directory=True)
    names = [run.name for run in load_runs([runs["difftune"], tmp_path / "a" / "difftune"])]
    assert len(set(names)) == 2


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    with pytest.raises(UserError, match=re.escape(f"{folder} is not a difftune run folder")):
        load_runs([folder])
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(folder) in err
    assert not (folder / "report.html").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2


def fake_run(folder: Path, *overrides: str, schedule: dict | None = DDPM, grids: int = 0) -> Path:
    """A run folder without training: its config, two log rows, a noise schedule and ``grids`` grids."""
    folder.mkdir(parents=True)
    make_cfg(folder / "no-model", folder, folder / "bank", *overrides).save(folder / "config.yaml")
    rows = [
        {"step": 1, "loss/total": 1.0, "loss_by_t/target_q1": 0.5, "loss_by_t/bank_q4": 0.7},
        {
            "step": 2,
            "eval/loss/target": 0.9,
            "eval/loss/target/t0-499": 0.8,
            "eval/loss/target/t500-999": 1.0,
        },
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "loss')
    if schedule is not None:
        (folder / "final" / "scheduler").mkdir(parents=True)
        (folder / "final" / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedule))
    if grids:
        (folder / "samples").mkdir()
        for step in range(1, grids + 1):
            Image.new("L", (8, 8), step * 20).save(folder / "samples" / f"step-{step:07d}.png")
    return folder


def test_densities_that_cannot_be_built_are_a_note(tmp_path: Path) -> None:
    no_fit = fake_run(tmp_path / "fit", "objective.target_schedule=data_driven")
    no_schedule = fake_run(tmp_path / "sched", schedule=None)
    for run, why in ((no_fit, "data_schedule.json"), (no_schedule, "no noise schedule found")):
        page = parse(render_page(load_runs([run])))
        text = "".join(page.text)
        assert "fig-densities" not in page.ids
        assert re.search(r"ψ/ξ not shown: .*" + re.escape(why), text), text
        assert "fig-train-loss" in page.ids and "fig-eval-loss" in page.ids
        assert "1 line(s) of metrics.jsonl could not be read" in text


def test_a_fitted_schedule_is_drawn_from_the_runs_fit(tmp_path: Path) -> None:
    from difftune.schedules.base import timestep_bins

    run = fake_run(
        tmp_path / "fit", "objective.target_schedule=data_driven", "objective.bank_schedule=data_driven"
    )
    edges = timestep_bins(1000, 4).tolist()
    fit = {
        "num_timesteps": 1000,
        "t_low": edges[:-1],
        "t_high": [e - 1 for e in edges[1:]],
        "loss_target": [1.0] * 4,
        "loss_bank": [1.0] * 4,
        "gap": [0.0] * 4,
        "gap_se": None,
        "psi": [0.5, 0.5, 1.5, 1.5],
        "xi": [1.5, 1.5, 0.5, 0.5],
        "uniform": False,
        "prediction_type": "epsilon",
        "draws_per_bin": 1,
        "rows_per_draw": 1,
        "forward_passes": 8,
        "seconds": 0.0,
        "seed": 0,
    }
    (run / "data_schedule.json").write_text(json.dumps(fit))
    page = parse(render_page(load_runs([run])))
    assert "fig-densities" in page.ids
    assert "ψ/ξ not shown" not in "".join(page.text)


def test_grids_are_capped_evenly_spaced(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "grids", grids=7)
    assert main(["report", str(run), "--max-grids", "3", "--out", str(tmp_path / "page.html")]) == 0
    page = parse((tmp_path / "page.html").read_text())
    steps = [int(a.rsplit(" ", 1)[1]) for a in alts(page) if a.startswith("samples of")]
    assert steps == [1, 4, 7]
    assert evenly_spaced(list(range(10)), 4) == [0, 3, 6, 9]
    assert evenly_spaced([1, 2], 12) == [1, 2]


@pytest.mark.parametrize(
    ("schedule", "process"),
    [
        (DDPM, "ddpm"),
        (
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
            "flow",
        ),
        ({"_class_name": "EDMEulerScheduler", "num_train_timesteps": 1000, "sigma_data": 0.5}, "edm"),
    ],
)
def test_densities_on_every_process(schedule: dict, process: str, tmp_path: Path) -> None:
    from difftune.report.densities import timestep_densities

    run = fake_run(tmp_path / process, "objective.power.axis=offsets", schedule=schedule)
    densities = timestep_densities(load_runs([run])[0])
    assert not isinstance(densities, str), densities
    assert densities.process == process and densities.target_name.startswith("logit_normal_up")
    # ψ toward noise (high t), ξ toward data (low t), each mean 1 over t
    assert densities.target[-1] > densities.target[0] and densities.bank[0] > densities.bank[-1]
    assert sum(densities.target) / len(densities.target) == pytest.approx(1.0)
