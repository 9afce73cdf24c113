"""Start-up time of the ``difftune`` command: this working tree against a baseline source tree.

Times, side by side in one run, two commands that load no model:

* ``difftune --help``;
* a refusal that needs only the config: ``difftune train --config c.yaml`` where ``c.yaml`` has an
  unknown key (``model.bogus``), which must end with exit code 2 and one ``difftune: error:`` line.

Each command runs as ``python -m difftune ...`` in a fresh interpreter, the same interpreter for both
trees, with ``PYTHONPATH=<tree>/src`` (the baseline: ``--baseline-src``, by default the base worktree
``/tmp/base-032f9e4/src``; the current tree: this repository's ``src``), from an empty temporary folder.
Repeats interleave the trees, in alternating order, so slow drift of the machine hits both alike. The
time is the wall clock of the whole process (``subprocess.run``), start-up of Python included.

Printed: which ``difftune`` each tree imports (a check that ``PYTHONPATH`` wins over the installed
package), then a Markdown table with the median seconds over ``--repeats`` for each command, before
(baseline) and after (current), and the speed-up before / after.

Usage (from the repository root, with the project's venv active)::

    python benchmarks/startup_time.py                        # 5 repeats, about a minute on a 2-core CPU
    python benchmarks/startup_time.py --repeats 9 --baseline-src ../old-checkout/src
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_SRC = Path(__file__).resolve().parents[1] / "src"
CONFIG = "model:\n  pretrained: ./model\n  bogus: 1\ndata:\n  path: ./data\nobjective:\n  bank_share: 0\n"
COMMANDS = {
    "`difftune --help`": (["--help"], 0),
    "`difftune train --config c.yaml` (unknown key)": (["train", "--config", "c.yaml"], 2),
}


def _env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src)}


def _imported_from(src: Path, cwd: Path) -> str:
    """Where ``import difftune`` finds the package with ``PYTHONPATH=src``."""
    done = subprocess.run(
        [sys.executable, "-c", "import difftune; print(difftune.__file__)"],
        cwd=cwd,
        env=_env(src),
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _time_once(src: Path, args: list[str], expected_code: int, cwd: Path) -> float:
    """Wall-clock seconds of ``python -m difftune ARGS``; exits if the command does not end as expected."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "difftune", *args], cwd=cwd, env=_env(src), capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    lines = done.stderr.splitlines()
    one_line_error = len(lines) == 1 and lines[0].startswith("difftune: error: ")
    if done.returncode != expected_code or (expected_code == 2 and not one_line_error):
        sys.exit(f"{src}: difftune {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", type=Path, default=Path("/tmp/base-032f9e4/src"))
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command per tree (median)")
    args = parser.parse_args()
    if not (args.baseline_src / "difftune").is_dir():
        sys.exit(f"--baseline-src {args.baseline_src} holds no difftune package")
    trees = {"before": args.baseline_src.resolve(), "after": REPO_SRC}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "model").mkdir()
        (cwd / "data" / "class0").mkdir(parents=True)
        (cwd / "c.yaml").write_text(CONFIG)
        for name, src in trees.items():
            print(f"{name}: {_imported_from(src, cwd)}")
        times: dict[tuple[str, str], list[float]] = {(c, t): [] for c in COMMANDS for t in trees}
        for argv, code in COMMANDS.values():  # one discarded round warms the file cache for both trees
            for src in trees.values():
                _time_once(src, argv, code, cwd)
        for repeat in range(args.repeats):
            order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
            for command, (argv, code) in COMMANDS.items():
                for tree in order:
                    times[command, tree].append(_time_once(trees[tree], argv, code, cwd))
    print(f"\nmedian wall-clock seconds over {args.repeats} runs (python {sys.version.split()[0]})\n")
    print("| command | before (s) | after (s) | speed-up (before / after) |")
    print("|---|---|---|---|")
    for command in COMMANDS:
        before = statistics.median(times[command, "before"])
        after = statistics.median(times[command, "after"])
        print(f"| {command} | {before:.2f} | {after:.2f} | {before / after:.1f}x |")


if __name__ == "__main__":
    main()
