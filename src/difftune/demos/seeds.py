"""A demo over seeds, as the study scripts run it: one output folder per seed, each seed run once."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from difftune.errors import UserError

RESULTS = "results.json"  # a demo writes it last: its presence marks a finished seed


def run_seeds(
    out: Path,
    seeds: Sequence[int],
    run: Callable[[Path, int], object],
    collect_only: bool = False,
    complete: Callable[[dict[str, Any]], bool] = lambda results: True,
) -> dict[int, dict[str, Any]]:
    """Run ``run(out / f"seed{k}", k)`` for each seed whose folder has no :data:`RESULTS` yet, or whose
    results are not ``complete`` (none with ``collect_only``), then return the results of every
    finished seed, by seed.

    Raises:
        UserError: no seed has finished.
    """
    for seed in seeds:
        folder = out / f"seed{seed}"
        done = (folder / RESULTS).is_file() and complete(json.loads((folder / RESULTS).read_text()))
        if not collect_only and not done:
            run(folder, seed)
    runs = {
        seed: json.loads((out / f"seed{seed}" / RESULTS).read_text())
        for seed in seeds
        if (out / f"seed{seed}" / RESULTS).is_file()
    }
    if not runs:
        raise UserError(f"no finished seeds in {out}: run the study without --summarise-only")
    return runs
