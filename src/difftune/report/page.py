"""The report page: one self-contained HTML file (every figure and sample grid embedded as a PNG
``data:`` URI, styles inline) for one run or a comparison of several."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from difftune.io.atomic import atomic_write_text
from difftune.report.run import RunRecord, evenly_spaced
from difftune.report.sequence import MEANINGS, SequenceRecord, load_report, summary_rows

DEFAULT_MAX_GRIDS = 12
STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img.figure { max-width: 100%; }
.note { color: #8a5a00; }
.grids { display: flex; flex-wrap: wrap; gap: 1em; }
.grids figure { margin: 0; }
.grids img { image-rendering: pixelated; width: 256px; }
figcaption { font-size: 0.85em; text-align: center; }
"""
# the rows of the summary's scores: key, label
SCORE_ROWS = (
    ("eval/loss/target", "val. loss target"),
    ("eval/loss/bank", "val. loss bank"),
    ("eval/fid", "FID"),
    ("eval/kid", "KID"),
    ("eval/forgetting", "forgetting"),
    ("eval/forgetting_fid", "forgetting FID"),
)


def _e(value: Any) -> str:
    """``value`` as escaped HTML text."""
    return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _img(data: str, alt: str, ident: str | None = None, cls: str = "figure") -> str:
    """An <img> of base64 PNG text."""
    ident_attr = f' id="{_e(ident)}"' if ident else ""
    return f'<img{ident_attr} class="{cls}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _schedule_label(cfg: Any, stream: str, densities: Any) -> str:
    """A stream's schedule with its settings: the built schedule's name where the densities were built."""
    if densities is not None and not isinstance(densities, str):
        return densities.target_name if stream == "target" else densities.bank_name
    if cfg is None:
        return "?"
    oc = cfg.objective
    name = oc.target_schedule if stream == "target" else oc.bank_schedule
    if name in ("power_up", "power_down"):
        return f"{name}(s={oc.exponent(name):g}, axis {oc.power.axis})"
    return name


def _summary_row(run: RunRecord, densities: Any) -> list[str]:
    """The summary table's cells (escaped HTML) of one run."""
    cfg, summary = run.config, run.summary
    model = cfg.model.pretrained if cfg is not None else summary.get("model", "?")
    tuning = cfg.tuning.method if cfg is not None else summary.get("tuning", "?")
    kind = cfg.objective.kind if cfg is not None else summary.get("retention", {}).get("objective", "?")
    bank_share = f"{cfg.objective.bank_share:g}" if cfg is not None else "?"
    planned = cfg.train.max_steps if cfg is not None else summary.get("max_steps", "?")
    last = run.last_step
    steps = f"{last if last is not None else '–'} of {planned}"
    scores = run.final_scores
    final = "<br>".join(
        f"{_e(label)} {_e(_number(scores[key]))}" for key, label in SCORE_ROWS if key in scores
    )
    best = "–"
    if run.best:
        best = (
            f"{_e(run.best.get('metric', '?'))} {_e(_number(run.best.get('score', '?')))} "
            f"at step {_e(run.best.get('step', '?'))}"
        )
    return [
        _e(run.name),
        _e(model),
        _e(tuning),
        _e(kind),
        _e(_schedule_label(cfg, "target", densities)),
        _e(_schedule_label(cfg, "bank", densities)),
        bank_share,
        _e(steps),
        final or "–",
        best,
    ]


def summary_table(runs: list[RunRecord], densities: list[Any]) -> str:
    """The summary: one row per run (model, tuning, objective, schedules, steps, final and best scores)."""
    head = ["run", "model", "tuning", "objective", "ψ (target)", "ξ (bank)", "bank share", "steps"]
    head += ["final scores", "best"]
    rows = [
        "<tr>" + "".join(f"<td>{cell}</td>" for cell in _summary_row(run, d)) + "</tr>"
        for run, d in zip(runs, densities, strict=True)
    ]
    header = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
    return f'<table id="summary-table">\n{header}\n' + "\n".join(rows) + "\n</table>"


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{_e(ident)}">\n<h2>{_e(title)}</h2>\n{body}\n</section>'


def _figure_section(ident: str, title: str, about: str, data: str | None, missing: str) -> str:
    """A section with one figure, or a one-line note when there is nothing to draw."""
    if data is None:
        return _section(ident, title, f'<p class="note">{_e(missing)}</p>')
    return _section(ident, title, f"<p>{_e(about)}</p>\n{_img(data, title, f'fig-{ident}')}")


def grids_section(runs: list[RunRecord], max_grids: int) -> str:
    """Each run's sample grids (``samples/step-*.png``) in step order, at most ``max_grids`` evenly spaced."""
    parts = []
    for run in runs:
        heading = f"<h3>{_e(run.name)}</h3>\n" if len(runs) > 1 else ""
        shown = evenly_spaced(run.grids, max_grids)
        if not shown:
            parts.append(f'{heading}<p class="note">no sample grids (train.sample_every)</p>')
            continue
        more = f" ({len(shown)} of {len(run.grids)}, evenly spaced)" if len(shown) < len(run.grids) else ""
        figures = []
        for step, path in shown:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            alt = f"samples of {run.name} at step {step}"
            figures.append(
                f"<figure>{_img(data, alt, cls='grid')}<figcaption>step {step}</figcaption></figure>"
            )
        parts.append(
            f'{heading}<p>sample grids{_e(more)}</p>\n<div class="grids">\n' + "\n".join(figures) + "\n</div>"
        )
    return _section("samples", "Sample grids over steps", "\n".join(parts))


def sequence_section(index: int, sequence: SequenceRecord) -> str:
    """A task sequence: the heat map of its scores, its summary's measures and what their signs mean."""
    from difftune.continual.heatmap import heat_map_png

    data = base64.b64encode(heat_map_png(sequence.matrix)).decode("ascii")
    rows = "\n".join(
        f"<tr><td>{_e(label)}</td><td>{'–' if value is None else _e(value)}</td></tr>"
        for label, value in summary_rows(sequence.matrix)
    )
    meanings = "\n".join(f"<li><b>{_e(term)}</b>: {_e(text)}</li>" for term, text in MEANINGS)
    stages = ", ".join(sequence.runs) or "none"
    notes = "".join(f'<p class="note">{_e(note)}</p>\n' for note in sequence.notes)
    body = (
        f"<p>{_e(sequence.path)}: the {_e(sequence.matrix.metric.upper())} of the model after each stage "
        f"on every task seen so far (column 0: the source). Stage runs in this report: {_e(stages)}.</p>\n"
        f"{notes}{_img(data, f'scores of {sequence.name}', f'fig-sequence-{index}')}\n"
        f'<table id="sequence-table-{index}">\n<tr><th>measure</th><th>value</th></tr>\n{rows}\n</table>\n'
        f"<ul>\n{meanings}\n</ul>"
    )
    return _section(f"sequence-{index}", f"Task sequence: {sequence.name}", body)


def render_page(
    runs: list[RunRecord],
    max_grids: int = DEFAULT_MAX_GRIDS,
    sequences: list[SequenceRecord] | None = None,
) -> str:
    """The report of ``runs`` (and of task ``sequences``, their stage runs among ``runs``) as one HTML
    page (a comparison page when there are several runs)."""
    from difftune.report import figures
    from difftune.report.densities import timestep_densities

    sequences = sequences or []
    densities = [timestep_densities(run) for run in runs]
    several = len(runs) > 1
    staged = {name for sequence in sequences for name in sequence.runs}
    shown = [s.name for s in sequences] + [r.name for r in runs if r.name not in staged]
    title = f"difftune report: {', '.join(shown)}"
    notes = [f"{run.name}: {note}" if several else note for run in runs for note in run.notes]
    notes += [
        f"{run.name}: {d}" if several else d
        for run, d in zip(runs, densities, strict=True)
        if isinstance(d, str)
    ]
    sections: list[tuple[str, str, str, Callable[[], str | None], str]] = [
        (
            "train-loss",
            "Training loss per quarter of t",
            "Unweighted denoising loss of each stream per quarter of t (q1 the least noisy), as logged "
            "(loss_by_t/...).",
            lambda: figures.train_loss_figure(runs),
            "no training loss per quarter of t was logged",
        ),
        (
            "eval-loss",
            "Validation loss per noise-level bin",
            "Held-out denoising loss per bin of t at fixed t and noise (eval/loss/<set>/t...): the target "
            "set (reconsolidation) and the bank (retention).",
            lambda: figures.eval_loss_figure(runs),
            "no validation loss was logged (train.eval_every with train.evaluation.holdout / bank_holdout)",
        ),
        (
            "eval-profile",
            "Validation loss over t, first and last evaluation",
            "The held-out loss per bin of t at the first evaluation (dashed) and the last (solid).",
            lambda: figures.eval_profile_figure(runs),
            "no validation loss was logged",
        ),
        (
            "densities",
            "ψ and ξ: the timestep densities",
            "The target stream's ψ and the bank stream's ξ over t as weights T·p(t) (mean 1), rebuilt "
            "from the run's config and its model's noise schedule.",
            lambda: figures.density_figure(runs, densities),
            "ψ/ξ could not be built for any run (see the notes)",
        ),
        (
            "scores",
            "FID, KID and forgetting over steps",
            "Scores of the training-time evaluations (eval/fid, eval/kid, eval/forgetting, "
            "eval/forgetting_fid); the best model's step is ringed.",
            lambda: figures.scores_figure(runs),
            "no FID, KID or forgetting score was logged (train.evaluation.samples)",
        ),
        (
            "pareto",
            "FID against forgetting",
            "Each evaluation as a point, labelled with its step; the best model's step is ringed.",
            lambda: figures.pareto_figure(runs),
            "no evaluation logged both eval/fid and eval/forgetting",
        ),
    ]
    body = [f"<h1>{_e(title)}</h1>"]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    folders = ", ".join(str(r.path) for r in [*sequences, *runs])
    body.append(f"<p>Written {_e(stamp)} from {_e(folders)}.</p>")
    if runs:
        body.append(_section("summary", "Summary", summary_table(runs, densities)))
    if notes:
        items = "\n".join(f'<li class="note">{_e(n)}</li>' for n in notes)
        body.append(_section("notes", "Notes", f"<ul>\n{items}\n</ul>"))
    body += [sequence_section(i, sequence) for i, sequence in enumerate(sequences, start=1)]
    if runs:
        body += [_figure_section(i, t, about, draw(), missing) for i, t, about, draw, missing in sections]
        body.append(grids_section(runs, max_grids))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_report(paths: list[Path], out: Path, max_grids: int = DEFAULT_MAX_GRIDS) -> Path:
    """Read the run and task sequence folders ``paths`` and write their report to ``out`` atomically;
    returns ``out``.

    Raises:
        UserError: a path is neither a run nor a sequence folder (see
            :func:`~difftune.report.sequence.load_report`).
    """
    runs, sequences = load_report(paths)
    atomic_write_text(out, render_page(runs, max_grids, sequences))
    return out
