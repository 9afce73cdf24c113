"""Parameter-efficient tuning: step time and peak memory per method against full fine-tuning, and
distillation with a LoRA student against the same LoRA run without distillation.

Two comparisons in one run, through :class:`difftune.training.loop.Trainer` itself, with the machinery of
``benchmarks/step_time.py`` (same source models, bank, target cache and timing):

* methods: every tuning method of :data:`difftune.tuning.TUNING_METHODS` (``tuning.method``: full,
  lora, loha, lokr, bitfit, difffit, adaptformer, vpt, svdiff), each with its default ``tuning``
  settings and the Diff-Tuning objective defaults (``power_up`` / ``power_down``, ``bank_share=0.2``,
  ``bank_weight=0.1``); the parameter-efficient ones at 3e-3, full fine-tuning at 1e-4, as in
  ``configs/reproduction/digits_peft.yaml`` (the learning rate costs nothing either way);
* distillation: ``lora`` with ``objective.kind=distillation`` (retention by distillation from the
  pre-trained model; the teacher is the same model with its adapters switched off, no copy) against
  the ``lora`` row above (Diff-Tuning retention on the bank): same model, data, bank, batch, seed.

How:

* one random-init class-conditional DiT (``--size``), its knowledge bank generated once, digits 5-9
  as the target, encoded once into a shared cache (``step_time.prepare``);
* step time as in step_time.py (``step_time.measure``): ``(train(warmup + steps) - train(warmup)) /
  steps`` with fresh trainers, so set-up and the final checkpoint cancel; one discarded short run of
  each configuration, then repeats that interleave all configurations in alternating order, so slow
  drift of the machine hits all alike; a one-thread CPU run reports process CPU time (the wall clock
  is printed beside the distillation ratio), a GPU run the CUDA-synchronised wall clock;
* trainable parameters and their share of all parameters: from each run's ``run_summary.json``;
* peak memory on CUDA: ``torch.cuda.reset_peak_memory_stats()`` before each timed ``train()`` and
  ``torch.cuda.max_memory_allocated()`` after, the median over a configuration's timed runs. It is
  the absolute peak of allocated memory: it includes the weights (``train()`` moves the model to the
  GPU) and whatever of the target data lives there; the caching allocator's reserve is not counted;
* peak memory on the CPU: how far the resident set grows during ``train()``, in a fresh process per
  configuration (this script re-invoked with a hidden ``--measure-memory`` flag), after the timing.
  The child builds a trainer and runs one warm-up ``train(warmup)``, which pays the lazy imports
  (tensorboard's writer, optimiser kernels, safetensors) and one-time caches; then, 3 times, it builds
  a fresh trainer, reads the current RSS (``/proc/self/statm``), resets the kernel's high-water mark
  to it (``/proc/self/clear_refs``), runs ``train(warmup)`` and takes the high-water mark
  (``VmHWM``) minus that RSS; the median of the 3 is reported. ``ru_maxrss`` would be the same
  number but for one flaw: the kernel folds into it the peak of the memory an ``exec`` replaced,
  here the parent's RSS, so in a child of this script it never drops below about 500 MiB. The
  child's glibc runs with ``MALLOC_MMAP_THRESHOLD_=4096``, ``MALLOC_TRIM_THRESHOLD_=0`` and
  ``MALLOC_ARENA_MAX=1``: freed buffers go back to the system rather than being kept for reuse, so
  the RSS follows live memory (with glibc's defaults, the second trainer of a process reuses the
  first one's freed memory: LoRA on the small DiT read anywhere from 0 to 12 MiB instead of 13-14).

What is in the numbers, and caveats. The CUDA peak holds everything allocated on the device. The
CPU growth holds what ``train()`` adds on top of the model already loaded and the data already
cached: gradients, AdamW moments and the EMA copy of the trainable parameters, activations, a
distillation teacher's forward, the final checkpoint's buffers; not the weights, imports or target
data. The two devices' ratios are therefore not comparable (the CPU ones are the stricter: the
frozen weights, the same for every method, are left out). On the CPU, buffers of 4 KiB or more are
counted in whole pages (small tensors, such as rank-8 adapter matrices, count up to twice their
size); smaller ones come from glibc's heap, whose reuse and fragmentation, like Python's own
allocator, move a measurement by a few hundred KiB between processes: on the small DiT that is
about 3% of a parameter-efficient method's growth, so memory ratios 0.03 apart are a tie. The
high-water reset needs Linux >= 4.0 (the RSS readings need Linux anyway); where it is refused the
output says so, and a peak reached before ``train()`` may then count (an upper bound).

Printed: a header (model, device, batch, learning rates, clock, how memory was measured); the
methods table (trainable parameters and share, median ms/step and IQR over repeats, peak MiB, and
last the ratios method / full of step time and of peak memory); the distillation block (the lora
and lora+distillation rows with ratios to lora, the per-repeat step-time ratios, the other clock's
ratio); the wall time; and on the LAST line ``distillation/lora ratios: memory <m> (target <=
1.05), step time <t>``: the LoRA distillation run's peak memory / the LoRA Diff-Tuning run's, and
the ratio of their median step times. The memory target is at most 1.05: with an adapter method
the teacher is the student with its adapters off, so distillation adds a no-grad forward of the
retention rows and no weights.

Usage (from the repository root, with the project's venv active)::

    python benchmarks/peft_bench.py                           # small DiT, all methods: ~4 min, 2-core CPU
    python benchmarks/peft_bench.py --methods lora --repeats 9  # full, lora and lora+distillation only
    python benchmarks/peft_bench.py --size dit-s --device cuda --steps 50 --batch-size 64 --repeats 7

Options: those of step_time.py (``--size {tiny,small,dit-s}``, ``--device {auto,cpu,cuda}``,
``--steps``, ``--warmup``, ``--batch-size``, ``--repeats``, ``--threads``, ``--clock``,
``--bank-samples``, ``--bank-steps``, ``--seed``, ``--keep``, ``--verbose``) and ``--methods NAME
...`` (a subset of the tuning methods; ``full`` and ``lora``, the bases of the ratios, and the LoRA
distillation run are always measured).

Defaults: ``--size small --steps 20 --repeats 5`` (step_time.py: 40 and 9), so that ten
configurations fit in a few minutes on a small CPU; ``--size tiny`` is faster but its memory growths
(about 1 MiB) are within the CPU measurement's noise.

Reading it: step-time ratios move by a few percent on a busy machine (see the per-repeat ratios of
the distillation block; step_time.py explains the clock); raise ``--repeats`` / ``--steps`` before
calling a small difference real. On the small DiT the loop's fixed costs weigh much more than on
DiT-S/2 or larger: step-time ratios to full fine-tuning are far from the FLOP ratios there, and
the distillation's extra cost per step (a no-grad forward of the retention rows, and switching the
adapters off and on) is likely larger, relative to a step, than on a model whose arithmetic dominates.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).parent))
import step_time  # noqa: E402

if TYPE_CHECKING:
    from difftune.training.loop import Trainer

PEFT_LEARNING_RATE = 3e-3  # the parameter-efficient methods' rate in configs/reproduction/digits_peft.yaml
BASE, STUDENT = "full", "lora"  # the bases of the methods' ratios and of the distillation ratio
DISTILLED = "lora+distillation"
MIB = 2**20
MEMORY_MARK = "peft-memory "  # a memory child's result line on its stdout: this mark, then JSON
MEMORY_RUNS = 3  # measured train() calls per memory child (after its warm-up); the median is reported
# the child's glibc maps every buffer of 4 KiB or more on its own and unmaps it when freed (a fixed
# threshold also turns off glibc's dynamic one, which rises to 32 MiB and keeps freed buffers for
# reuse), gives the top of its heap back at once, and keeps one arena: the RSS follows live memory
CHILD_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    step_time.add_arguments(
        p, steps=20, repeats=5, batch_help="global batch (target + bank), equal for all configurations"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="tuning methods of the table (default: all registered); full, lora and lora+distillation "
        "always run",
    )
    # internal: measure one configuration's CPU memory in this (fresh) process; see the docstring
    p.add_argument("--measure-memory", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    return step_time.check_args(p, p.parse_args(argv))


def configurations(args: argparse.Namespace) -> dict[str, step_time.Run]:
    """The measured runs by name: the tuning methods (``full`` and ``lora`` first), then LoRA distillation."""
    from difftune.tuning import TUNING_METHODS

    chosen = args.methods or list(TUNING_METHODS)
    unknown = sorted(set(chosen) - set(TUNING_METHODS))
    if unknown:
        sys.exit(f"{Path(sys.argv[0]).name}: unknown --methods {unknown}; valid: {sorted(TUNING_METHODS)}")
    names = [BASE, STUDENT] + [m for m in TUNING_METHODS if m in chosen and m not in (BASE, STUDENT)]
    runs = {
        name: step_time.Run(
            tuning={"method": name}, learning_rate=None if name == BASE else PEFT_LEARNING_RATE
        )
        for name in names
    }
    runs[DISTILLED] = dataclasses.replace(runs[STUDENT], objective={"kind": "distillation"})
    return runs


@dataclasses.dataclass
class Observed:
    """What the probes saw of one configuration: trainable parameters and peak memory (bytes)."""

    trainable: int = 0
    share: float = 0.0
    peak: list[int] = dataclasses.field(default_factory=list)
    reset: bool = True  # CPU: the RSS high-water mark could be reset before train()


def read_summary(trainer: Trainer, seen: Observed) -> None:
    summary = json.loads((trainer.out / "run_summary.json").read_text())
    seen.trainable, seen.share = summary["trainable_parameters"], summary["trainable_share"]


@contextlib.contextmanager
def cuda_probe(trainer: Trainer, seen: Observed) -> Iterator[None]:
    """Peak allocated CUDA memory of the ``train()`` it wraps, and the run's trainable parameters."""
    import torch

    gc.collect()  # earlier trainers' garbage would count in the peak
    torch.cuda.reset_peak_memory_stats()
    yield
    seen.peak.append(torch.cuda.max_memory_allocated())
    read_summary(trainer, seen)


@contextlib.contextmanager
def summary_probe(trainer: Trainer, seen: Observed) -> Iterator[None]:
    """The run's trainable parameters only (CPU runs: memory is measured in fresh processes)."""
    yield
    read_summary(trainer, seen)


def rss_bytes() -> int:
    """Current resident set size."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set (``VmHWM``), which ``clear_refs`` resets.

    Not ``ru_maxrss``: ``getrusage`` also counts the peak of the memory an ``exec`` replaced, which
    for a child of this script is the parent's whole RSS, and a reset does not lower it.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return peak_rss_bytes() <= rss_bytes() + MIB


@contextlib.contextmanager
def rss_probe(trainer: Trainer, seen: Observed) -> Iterator[None]:
    """Growth of the peak RSS during the ``train()`` it wraps, over the RSS just before it."""
    gc.collect()
    before = rss_bytes()
    seen.reset = reset_peak_rss()
    yield
    seen.peak.append(peak_rss_bytes() - before)
    read_summary(trainer, seen)


def measure_memory_here(args: argparse.Namespace) -> int:
    """The hidden ``--measure-memory CONFIG`` mode: one configuration's RSS growth, in this process."""
    step_time.start(args)
    raw = json.loads(args.setup.read_text())
    setup = step_time.Setup(
        Path(raw["source"]), Path(raw["bank"]), Path(raw["cache"]), raw["description"], raw["device"]
    )
    run = configurations(args)[args.measure_memory]
    out = args.setup.parent / f"memory-{args.measure_memory.replace('+', '-')}"
    seen, resets = Observed(), []
    with contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO()):
        step_time.timed_train(setup, run, args, out.with_name(out.name + "-warm"), args.warmup)
        for _ in range(MEMORY_RUNS):
            step_time.timed_train(setup, run, args, out, args.warmup, lambda t: rss_probe(t, seen))
            resets.append(seen.reset)
    print(MEMORY_MARK + json.dumps({"growth": seen.peak, "reset": all(resets)}))
    return 0


def measure_memory_apart(argv: list[str], setup_file: Path, name: str) -> tuple[list[int], bool]:
    """(RSS growths in bytes, high-water mark reset) of ``name``'s runs, measured in a fresh process."""
    command = [
        *(sys.executable, __file__, *argv),
        *("--device", "cpu", "--measure-memory", name, "--setup", str(setup_file)),
    ]
    child = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **CHILD_MALLOC})
    lines = [line for line in child.stdout.splitlines() if line.startswith(MEMORY_MARK)]
    if child.returncode != 0 or not lines:
        sys.stderr.write(child.stdout[-4000:] + child.stderr[-4000:])
        sys.exit(
            f"{Path(sys.argv[0]).name}: the memory measurement of {name} failed (exit {child.returncode})"
        )
    result = json.loads(lines[-1][len(MEMORY_MARK) :])
    return [int(g) for g in result["growth"]], bool(result["reset"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.measure_memory:
        return measure_memory_here(args)
    step_time.start(args)
    wall = time.perf_counter()
    runs = configurations(args)
    seen = {name: Observed() for name in runs}
    with step_time.scratch(args, "difftune-peft-") as work:
        setup = step_time.prepare(args, work)
        cuda = setup.device == "cuda"
        probe = cuda_probe if cuda else summary_probe
        # the trainer prints its run summary on stdout: once per run here, so only with --verbose
        with contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO()):
            times = step_time.measure(
                setup, runs, args, work, lambda name: lambda trainer: probe(trainer, seen[name])
            )
        if not cuda:
            setup_file = work / "setup.json"
            setup_file.write_text(json.dumps(dataclasses.asdict(setup), default=str))
            for name in runs:
                seen[name].peak, seen[name].reset = measure_memory_apart(argv, setup_file, name)
    report(args, setup, times, seen)
    print(f"wall time {time.perf_counter() - wall:.0f} s")
    step_ratio, memory_ratio = ratios(args, setup, times, seen, DISTILLED, STUDENT)
    print(f"distillation/lora ratios: memory {memory_ratio:.3f} (target <= 1.05), step time {step_ratio:.3f}")
    return 0


def ratios(
    args: argparse.Namespace,
    setup: step_time.Setup,
    times: dict[str, list[dict[str, float]]],
    seen: dict[str, Observed],
    name: str,
    base: str,
) -> tuple[float, float]:
    """(median step time, median peak memory) of ``name`` over those of ``base``."""
    clock = step_time.resolve_clock(args, setup.device)
    time_of = {n: statistics.median(t[clock] for t in times[n]) for n in (name, base)}
    memory_of = {n: statistics.median(seen[n].peak) for n in (name, base)}
    return time_of[name] / time_of[base], memory_of[name] / memory_of[base]


def report(
    args: argparse.Namespace,
    setup: step_time.Setup,
    times: dict[str, list[dict[str, float]]],
    seen: dict[str, Observed],
) -> None:
    """Everything but the wall time and the last line: header, methods table, distillation block."""
    import torch

    from difftune.config.experiment import TrainConfig

    clock = step_time.resolve_clock(args, setup.device)
    other = "wall" if clock == "cpu" else "cpu"
    threads = torch.get_num_threads()
    n_bank = int(0.2 * args.batch_size)
    steps = f"(train({args.warmup + args.steps}) - train({args.warmup})) / {args.steps}"
    if setup.device == "cuda":
        memory = (
            "peak allocated CUDA memory during train(): max_memory_allocated after reset_peak_memory_stats"
        )
    else:
        reset = all(s.reset for s in seen.values())
        how = "high-water mark reset before train()" if reset else "NO high-water reset: upper bounds"
        memory = (
            f"growth of the peak RSS during train(): VmHWM after - RSS before ({how});\n         median "
            f"of {MEMORY_RUNS} runs in a fresh process per configuration, after a warm-up train({args.warmup})"
        )
    cpu_threads = f" ({threads} thread{'s' if threads > 1 else ''})" if setup.device == "cpu" else ""
    print(
        "difftune PEFT benchmark: tuning methods vs full fine-tuning, distillation vs Diff-Tuning with LoRA"
    )
    print(f"model    {args.size}: {setup.description}")
    print(
        f"device   {setup.device}{cpu_threads}; global batch {args.batch_size} ({args.batch_size - n_bank} "
        f"target + {n_bank} bank); learning rate {PEFT_LEARNING_RATE:g} (full: {TrainConfig.learning_rate:g})"
    )
    print(f"timing   {step_time.CLOCK_NAMES[clock]}; {args.repeats} interleaved repeats of {steps} steps")
    print(f"memory   {memory}")

    def row(name: str, base: str) -> str:
        ms = [1000 * t[clock] for t in times[name]]
        step_ratio, memory_ratio = ratios(args, setup, times, seen, name, base)
        return (
            f"{name:<18}{seen[name].trainable:>12,}{100 * seen[name].share:>8.2f}%"
            f"{statistics.median(ms):>11.2f}{step_time.iqr(ms):>8.2f}"
            f"{statistics.median(seen[name].peak) / MIB:>10.2f}{step_ratio:>10.3f}{memory_ratio:>10.3f}"
        )

    def header(base: str) -> str:
        return (
            f"{'method':<18}{'trainable':>12}{'share':>9}{'ms/step':>11}{'IQR ms':>8}{'peak MiB':>10}"
            f"{'time/' + base:>10}{'mem/' + base:>10}"
        )

    print()
    print("methods, Diff-Tuning objective (ms/step: median over repeats; ratios: method / full)")
    print(header(BASE))
    for name in seen:
        if name != DISTILLED:
            print(row(name, BASE))
    print()
    print("distillation with a LoRA student vs the same LoRA run with Diff-Tuning's bank loss instead")
    print(header(STUDENT))
    for name in (STUDENT, DISTILLED):
        print(row(name, STUDENT))
    per_repeat = [d[clock] / s[clock] for d, s in zip(times[DISTILLED], times[STUDENT], strict=True)]
    print("per-repeat step-time ratios  " + " ".join(f"{x:.3f}" for x in per_repeat))
    cross = statistics.median(t[other] for t in times[DISTILLED]) / statistics.median(
        t[other] for t in times[STUDENT]
    )
    print(
        f"median of per-repeat ratios {statistics.median(per_repeat):.3f} (IQR {step_time.iqr(per_repeat):.3f}); "
        f"{step_time.CLOCK_NAMES[other]} (cross-check) ratio {cross:.3f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
