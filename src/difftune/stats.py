"""Statistics for results over seeds: paired differences and their confidence intervals."""

from __future__ import annotations

import math
import statistics


def paired_ci(differences: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-seed paired differences and its two-sided t interval: ``(mean, low, high)``.

    A single difference gives an infinitely wide interval.
    """
    from scipy import stats

    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return mean, -math.inf, math.inf
    sem = statistics.stdev(differences) / len(differences) ** 0.5
    half = stats.t.ppf(0.5 + level / 2, len(differences) - 1) * sem
    return mean, mean - half, mean + half
