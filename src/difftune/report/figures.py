"""The report's figures, drawn with matplotlib (Agg) and returned as base64 PNG text for a ``data:`` URI.

Every function takes the runs of the page (one, or several to compare) and returns None when none of
them has what the figure shows. With one run, a panel's lines are the quarters or bins of t; with
several, each run is one colour (its legend entry is the run's name).
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

from difftune.report.run import RunRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from difftune.report.densities import Densities

STREAMS = ("target", "bank")
QUARTERS = (1, 2, 3, 4)
PANELS_PER_ROW = 5  # of the per-bin validation-loss panels when runs are compared
# each score's panel: title, y label
SCORE_LABELS = {
    "eval/fid": ("FID", "FID (held-out target)"),
    "eval/kid": ("KID", "KID (held-out target)"),
    "eval/forgetting": ("forgetting", "mean squared pixel change of bank samples"),
    "eval/forgetting_fid": ("forgetting FID", "FID of regenerated bank samples"),
}


def _figure(rows: int, cols: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, Any]:
    """A figure of ``rows`` × ``cols`` panels (a 2-D array of axes), on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _png(fig: Figure) -> str:
    """The figure as base64 PNG text."""
    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _plot(ax: Axes, steps: list[int], values: list[float], **style: Any) -> None:
    """A curve over steps: points marked where there are few (training rows log some quarters only)."""
    ax.plot(steps, values, marker="o" if len(steps) <= 40 else None, markersize=3, linewidth=1.2, **style)


def train_loss_figure(runs: list[RunRecord]) -> str | None:
    """The unweighted training loss per quarter of t for both streams over steps (``loss_by_t/...``)."""
    keys = {f"loss_by_t/{s}_q{q}" for s in STREAMS for q in QUARTERS}
    present = {k for r in runs for row in r.train_rows for k in row if k in keys}
    if not present:
        return None
    streams = [s for s in STREAMS if any(k.startswith(f"loss_by_t/{s}_") for k in present)]
    if len(runs) == 1:
        fig, axes = _figure(1, len(streams))
        for ax, stream in zip(axes[0], streams, strict=True):
            for q in QUARTERS:
                steps, values = runs[0].series(f"loss_by_t/{stream}_q{q}")
                if steps:
                    _plot(ax, steps, values, label=f"quarter {q} of t", color=_colour(q - 1))
            ax.set(xlabel="step", ylabel="loss (unweighted)", title=f"training loss, {stream} stream")
        return _png(fig)
    fig, axes = _figure(len(streams), 4, width=3.4)
    for row, stream in zip(axes, streams, strict=True):
        for ax, q in zip(row, QUARTERS, strict=True):
            for i, run in enumerate(runs):
                steps, values = run.series(f"loss_by_t/{stream}_q{q}")
                if steps:
                    _plot(ax, steps, values, label=run.name, color=_colour(i))
            ax.set(xlabel="step", ylabel="loss (unweighted)", title=f"{stream}, quarter {q} of t")
    return _png(fig)


def eval_loss_figure(runs: list[RunRecord]) -> str | None:
    """The held-out validation loss per noise-level bin over steps, for the target set and the bank."""
    streams = [s for s in STREAMS if any(r.eval_bins(s) for r in runs)]
    if not streams:
        return None
    if len(runs) == 1:
        run = runs[0]
        fig, axes = _figure(1, len(streams))
        for ax, stream in zip(axes[0], streams, strict=True):
            bins = run.eval_bins(stream)
            for i, (low, high) in enumerate(bins):
                steps, values = run.series(f"eval/loss/{stream}/t{low}-{high}")
                _plot(ax, steps, values, label=f"t {low}–{high}", color=_colour(i))
            steps, values = run.series(f"eval/loss/{stream}")
            if steps:
                _plot(ax, steps, values, label="mean", color="black", linestyle="--")
            ax.set(xlabel="step", ylabel="held-out loss", title=f"validation loss, {stream} (per bin of t)")
        return _png(fig)
    # one panel per bin of each set, at most PANELS_PER_ROW to a row; each run one line
    panels = [(s, b) for s in streams for b in sorted({b for r in runs for b in r.eval_bins(s)})]
    rows = [[p for p in panels if p[0] == s] for s in streams]
    rows = [row[i : i + PANELS_PER_ROW] for row in rows for i in range(0, len(row), PANELS_PER_ROW)]
    fig, axes = _figure(len(rows), max(len(row) for row in rows), width=3.4)
    for ax_row, row in zip(axes, rows, strict=True):
        for ax, (stream, (low, high)) in zip(ax_row, row, strict=False):
            for i, run in enumerate(runs):
                steps, values = run.series(f"eval/loss/{stream}/t{low}-{high}")
                if steps:
                    _plot(ax, steps, values, label=run.name, color=_colour(i))
            ax.set(xlabel="step", ylabel="held-out loss", title=f"{stream}, t {low}–{high}")
        for ax in ax_row[len(row) :]:
            ax.set_visible(False)
    return _png(fig)


def eval_profile_figure(runs: list[RunRecord]) -> str | None:
    """The validation loss over t at the first evaluation (dashed) and the last (solid), per set."""
    streams = [s for s in STREAMS if any(r.eval_bins(s) for r in runs)]
    if not streams:
        return None
    fig, axes = _figure(1, len(streams))
    for ax, stream in zip(axes[0], streams, strict=True):
        for i, run in enumerate(runs):
            bins = run.eval_bins(stream)
            rows = [r for r in run.eval_rows if any(f"eval/loss/{stream}/t{lo}-{hi}" in r for lo, hi in bins)]
            if not rows:
                continue
            for row, style, when in ((rows[0], "--", "first"), (rows[-1], "-", "last")):
                pairs = [
                    ((lo + hi) / 2, row[f"eval/loss/{stream}/t{lo}-{hi}"])
                    for lo, hi in bins
                    if f"eval/loss/{stream}/t{lo}-{hi}" in row
                ]
                label = f"{run.name + ', ' if len(runs) > 1 else ''}{when} (step {row['step']})"
                ax.plot(*zip(*pairs, strict=True), linestyle=style, marker="o", color=_colour(i), label=label)
        ax.set(
            xlabel="t (bin centre; 0 = least noise)", ylabel="held-out loss", title=f"{stream}: loss over t"
        )
    return _png(fig)


def density_figure(runs: list[RunRecord], densities: list[Densities | str]) -> str | None:
    """ψ (target stream) and ξ (bank stream) over t as weights T·p(t); runs without densities are left out."""
    built = [(r, d) for r, d in zip(runs, densities, strict=True) if not isinstance(d, str)]
    if not built:
        return None
    fig, axes = _figure(1, 2, width=5.0)
    panels = (("target", "ψ: target-stream density"), ("bank", "ξ: bank-stream density"))
    for ax, (stream, title) in zip(axes[0], panels, strict=True):
        for i, (run, d) in enumerate(built):
            values = d.target if stream == "target" else d.bank
            name = d.target_name if stream == "target" else d.bank_name
            unused = "" if stream == "target" or d.bank_used else ", unused: bank_share 0"
            who = f"{run.name}: " if len(runs) > 1 else ""
            ax.plot(range(len(values)), values, color=_colour(i), label=f"{who}{name} ({d.process}{unused})")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set(xlabel="t (0 = least noise)", ylabel="T · p(t)", title=title)
    return _png(fig)


def _best(run: RunRecord) -> tuple[str, int] | None:
    """The key and step of the run's best model (``best/best.json``), if it has one."""
    if run.best and isinstance(run.best.get("step"), int):
        return str(run.best.get("key", "")), int(run.best["step"])
    return None


def scores_figure(runs: list[RunRecord]) -> str | None:
    """FID, KID and the forgetting scores over steps (one panel each that any run logs); the best step
    is ringed on the panel of the best model's metric."""
    keys = [k for k in SCORE_LABELS if any(run.series(k)[0] for run in runs)]
    if not keys:
        return None
    fig, axes = _figure(1, len(keys))
    for ax, key in zip(axes[0], keys, strict=True):
        for i, run in enumerate(runs):
            steps, values = run.series(key)
            if not steps:
                continue
            _plot(ax, steps, values, label=run.name if len(runs) > 1 else None, color=_colour(i))
            best = _best(run)
            if best and best[0] == key and best[1] in steps:
                y = values[steps.index(best[1])]
                ax.scatter([best[1]], [y], s=160, facecolors="none", edgecolors="red", linewidths=2, zorder=3)
                ax.annotate("best", (best[1], y), textcoords="offset points", xytext=(6, 6), color="red")
        ax.set(xlabel="step", ylabel=SCORE_LABELS[key][1], title=SCORE_LABELS[key][0])
    return _png(fig)


def pareto_figure(runs: list[RunRecord]) -> str | None:
    """Every evaluation as a point (x: ``eval/forgetting``, y: ``eval/fid``), labelled with its step; the
    best model's step is ringed. One series per run."""
    series = []
    for i, run in enumerate(runs):
        points = [
            (int(r["step"]), float(r["eval/forgetting"]), float(r["eval/fid"]))
            for r in run.eval_rows
            if isinstance(r.get("eval/forgetting"), (int, float))
            and isinstance(r.get("eval/fid"), (int, float))
        ]
        if points:
            series.append((i, run, points))
    if not series:
        return None
    fig, axes = _figure(1, 1, width=6.0, height=4.5)
    ax = axes[0][0]
    for i, run, points in series:
        steps, xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", linestyle=":", color=_colour(i), label=run.name)
        for step, x, y in points:
            ax.annotate(str(step), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        best = _best(run)
        if best and best[1] in steps:
            j = steps.index(best[1])
            ax.scatter([xs[j]], [ys[j]], s=180, facecolors="none", edgecolors="red", linewidths=2, zorder=3)
    ax.set(
        xlabel="forgetting (eval/forgetting, lower retains more)",
        ylabel="FID (eval/fid, lower is better)",
        title="evaluations: FID against forgetting (ringed: best/)",
    )
    return _png(fig)
