"""ControlNet condition fidelity and when training converges to it.

At a validation step, images generated from fixed (prompt, condition) pairs are annotated again with
the annotator that made the conditions (:mod:`~difftune.control.annotators`); the re-extracted control
is scored against the input one (:mod:`~difftune.control.fidelity`) and the scores are logged to the
run's ``fidelity.jsonl`` (:mod:`~difftune.control.log`). :mod:`~difftune.control.convergence` finds
the step where the dissimilarity dropped for good ("sudden convergence"); ``difftune convergence``
reports it for runs. Nothing here imports OpenCV until an annotator runs, nor torch until an annotator
or a fidelity score is asked for (``difftune convergence`` reads logs only).
"""

from __future__ import annotations

from difftune.control.convergence import (
    ConvergenceSummary,
    changepoint_step,
    check_curve,
    curve_area,
    sudden_convergence_step,
    summarise,
)
from difftune.control.log import FIDELITY_FILE, append_fidelity, read_fidelity
from difftune.lazy import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {
        "ANNOTATORS": "annotators",
        "Annotator": "annotators",
        "CannyAnnotator": "annotators",
        "build_annotator": "annotators",
        "condition_fidelity": "fidelity",
        "edge_f1": "fidelity",
        "per_sample_fidelity": "fidelity",
    },
)

__all__ = [
    "ANNOTATORS",
    "FIDELITY_FILE",
    "Annotator",
    "CannyAnnotator",
    "ConvergenceSummary",
    "append_fidelity",
    "build_annotator",
    "changepoint_step",
    "check_curve",
    "condition_fidelity",
    "curve_area",
    "edge_f1",
    "per_sample_fidelity",
    "read_fidelity",
    "sudden_convergence_step",
    "summarise",
]
