"""When did a fidelity curve converge? Analysis of ``(step, value)`` curves where lower is better.

The values are a dissimilarity between the input control and the one re-extracted from generated
images (``mse``, ``dssim``, or ``1 - edge_f1``), logged at validation steps. ControlNet's "sudden
convergence" shows as a drop from a high level to a low one. Two ways to place it:

- :func:`sudden_convergence_step`, with a threshold: the first step from which the curve stays at or
  below it for good (a dip that comes back up does not count);
- :func:`changepoint_step`, without one: the split of the curve into two constant levels that fits it
  best in least squares, when the later level is the lower.

:func:`curve_area` summarises the whole curve: its mean level over the steps (lower = converged sooner
or further).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from difftune.errors import UserError

__all__ = [
    "ConvergenceSummary",
    "changepoint_step",
    "curve_area",
    "check_curve",
    "sudden_convergence_step",
    "summarise",
]


def check_curve(steps: Sequence[int], values: Sequence[float]) -> None:
    """Refuse a curve that is empty, of unequal lengths, not strictly increasing in step, or not finite.

    Raises:
        UserError: the message names the first problem found.
    """
    if len(steps) != len(values):
        raise UserError(f"a curve needs one value per step, got {len(steps)} steps and {len(values)} values")
    if not steps:
        raise UserError("the curve is empty: no validation step was logged")
    for before, after in pairwise(steps):
        if after <= before:
            raise UserError(f"steps must be strictly increasing, got {before} then {after}")
    for step, value in zip(steps, values, strict=True):
        if not math.isfinite(value):
            raise UserError(f"the value at step {step} is {value}; fidelity values must be finite")


def sudden_convergence_step(steps: Sequence[int], values: Sequence[float], threshold: float) -> int | None:
    """The first step from which every value (at it and at all later steps) is ``<= threshold``.

    None if the last value is above the threshold (the curve never converged, or re-diverged).

    Raises:
        UserError: the curve is invalid (see :func:`check_curve`) or the threshold is not finite.
    """
    check_curve(steps, values)
    if not math.isfinite(threshold):
        raise UserError(f"the convergence threshold must be finite, got {threshold}")
    first = None
    for step, value in zip(reversed(steps), reversed(values), strict=True):
        if value > threshold:
            break
        first = step
    return first


def changepoint_step(steps: Sequence[int], values: Sequence[float]) -> int | None:
    """The step where the curve best splits into a higher level followed by a lower one.

    For every split ``k = 1 .. n-1`` the curve is fitted by two constants, the mean of ``values[:k]``
    and the mean of ``values[k:]``; the split with the least total squared error wins (the earliest on a
    tie) and ``steps[k]``, the first step of the second segment, is returned. None if the second level is
    not lower than the first (no drop to converge by), or for fewer than 2 points.

    Raises:
        UserError: the curve is invalid (see :func:`check_curve`).
    """
    check_curve(steps, values)
    y = np.asarray(values, dtype=np.float64)
    if len(y) < 2:
        return None
    errors = [_squared_error(y[:k]) + _squared_error(y[k:]) for k in range(1, len(y))]
    k = int(np.argmin(errors)) + 1
    before, after = float(y[:k].mean()), float(y[k:].mean())
    if after >= before or math.isclose(after, before, rel_tol=1e-9, abs_tol=1e-12):
        return None
    return int(steps[k])


def _squared_error(segment: np.ndarray) -> float:
    """The squared error of a segment around its mean (its best constant fit)."""
    return float(((segment - segment.mean()) ** 2).sum())


def curve_area(steps: Sequence[int], values: Sequence[float]) -> float:
    """The area under the curve (trapezoid rule) divided by its step span: the curve's mean level.

    Lower means the curve came down sooner or further. A one-point curve's area is its value.

    Raises:
        UserError: the curve is invalid (see :func:`check_curve`).
    """
    check_curve(steps, values)
    if len(steps) == 1:
        return float(values[0])
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    return area / float(x[-1] - x[0])


@dataclass(frozen=True)
class ConvergenceSummary:
    """The convergence of one curve.

    Attributes:
        step: :func:`sudden_convergence_step` at the threshold (None: not converged).
        changepoint: :func:`changepoint_step` (None: no drop).
        area: :func:`curve_area`, the curve's mean level.
        final: the value at the last step.
    """

    step: int | None
    changepoint: int | None
    area: float
    final: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def summarise(steps: Sequence[int], values: Sequence[float], threshold: float) -> ConvergenceSummary:
    """:class:`ConvergenceSummary` of a curve (lower = better) for a convergence threshold.

    Raises:
        UserError: the curve is invalid (see :func:`check_curve`) or the threshold is not finite.
    """
    return ConvergenceSummary(
        step=sudden_convergence_step(steps, values, threshold),
        changepoint=changepoint_step(steps, values),
        area=curve_area(steps, values),
        final=float(values[-1]),
    )
