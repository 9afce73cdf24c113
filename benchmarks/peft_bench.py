"""Parameter-efficient tuning: step time and peak memory per method against full fine-tuning, and
distillation with a LoRA student against the same LoRA run without distillation.

Two comparisons in one run, through :class:`difftune.trainer.Trainer` itself, with the machinery of
``benchmarks/step_time.py`` (same source models, bank, target cache and timing):

* methods: every tuning method of :data:`difftune.tuning.TUNING_METHODS` (``model.tuning``: full,
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
* step time as in step_time.py: ``(train(warmup + steps) - train(warmup)) / steps`` with fresh
  trainers, so set-up and the final checkpoint cancel; one discarded short run of each
  configuration, then repeats that interleave all configurations in alternating order, so slow
  drift of the machine hits all alike; a one-thread CPU run reports process CPU time (the wall clock
  is printed beside the distillation ratio), a GPU run the CUDA-synchronised wall clock;
* trainable parameters and their share of all parameters: from each run's ``run_summary.json``;
* peak memory, on CUDA: ``torch.cuda.reset_peak_memory_stats()`` before each timed ``train()`` and
  ``torch.cuda.max_memory_allocated()`` after; the largest over a configuration's timed runs. It is
  the absolute peak of allocated memory, so it includes the weights (``train()`` moves the model to
  the GPU) and the target data on the device; the caching allocator's reserve is not counted;
* peak memory, on the CPU: the growth of the resident set during ``train()``, measured once per
  configuration in a fresh process (this script, re-invoked with a hidden ``--measure-memory``
  flag): the child builds a trainer and runs one short warm-up ``train()`` (which pays the lazy
  imports: tensorboard's writer, optimiser kernels, safetensors), then builds a fresh trainer,
  reads its current RSS (``/proc/self/statm``), resets the kernel's high-water mark
  (``/proc/self/clear_refs``; without it, a peak reached before ``train()`` would count), runs
  ``train(warmup)`` and reports ``ru_maxrss`` (``getrusage``) minus that RSS. The child runs with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed buffers to the system instead of
  keeping them for reuse: the RSS then follows live memory closely.

What is (and is not) in the numbers: the CUDA peak holds everything allocated on the device; the CPU
growth holds what ``train()`` adds on top of the model already loaded and the data already cached
(the gradients, the AdamW moments and the EMA copy of the trainable parameters, activations, a
distillation teacher's forward, the final checkpoint's buffers), and not the weights, the imports
or the target data. The ratios of the two devices are therefore not comparable. CPU caveats: RSS
counts pages, not bytes (a few KiB of granularity), buffers below the mmap threshold come from
glibc's heap, which may still reuse freed memory; the peak includes the checkpoint written at the
end of ``train()``; a number of the order of a MiB is within this noise. The high-water reset needs
Linux >= 4.0; where it fails the output says so and the growth is an upper bound.

Printed: a header (model, device, batch, clock, how memory was measured); the methods table
(trainable parameters, share, median ms/step and IQR over repeats, peak MiB, and last the ratios
method/full of step time and of memory); the distillation block (both rows, per-repeat step-time
ratios, the other clock's ratio); the wall time; and on the LAST line
``distillation/lora ratios: memory <m> (target <= 1.05), step time <t>``: peak memory of the LoRA
distillation run / that of the LoRA Diff-Tuning run, and the median step-time ratio of the two.
The memory target is at most 1.05: with an adapter method the teacher is the student with its
adapters off, so distillation adds one no-grad forward on the retention rows and no weights.

Usage (from the repository root, with the project's venv active)::

    python benchmarks/peft_bench.py                                  # small DiT, all methods, ~5 min on a 2-core CPU
    python benchmarks/peft_bench.py --methods lora --repeats 9        # full, lora, lora+distillation only
    python benchmarks/peft_bench.py --size dit-s --device cuda --steps 50 --batch-size 64 --repeats 7

Options: those of step_time.py (``--size {tiny,small,dit-s}``, ``--device {auto,cpu,cuda}``,
``--steps``, ``--warmup``, ``--batch-size``, ``--repeats``, ``--threads``, ``--clock``,
``--bank-samples``, ``--bank-steps``, ``--seed``, ``--keep``, ``--verbose``) and ``--methods NAME
...`` (a subset of the tuning methods; ``full`` and ``lora``, the bases of the ratios, and the LoRA
distillation run are always measured).

Reading it: step-time ratios move by a few percent on a busy machine (see the per-repeat ratios of
the distillation block; step_time.py explains the clock); raise ``--repeats`` / ``--steps`` before
calling a small difference real. On the small DiT many methods cost about what full fine-tuning
costs per step: the model is so small that the loop, not the arithmetic, dominates.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import os
import resource
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
    from difftune.trainer import Trainer

PEFT_LEARNING_RATE = 3e-3  # the parameter-efficient methods' rate in configs/reproduction/digits_peft.yaml
BASE, STUDENT = "full", "lora"  # the bases of the methods' ratios and of the distillation ratio
DISTILLED = "lora+distillation"
MIB = 2**20
MEMORY_MARK = "peft-memory "  # a memory child's result line on its stdout: this mark, then JSON
# the child's glibc mmaps every buffer of 64 KiB or more and unmaps it when freed (a fixed threshold
# also turns off glibc's dynamic one, which would otherwise rise to 32 MiB and keep freed buffers)
CHILD_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


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
        help="tuning methods of the table (default: all registered); full, lora and lora+distillation always run",
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
        name: step_time.Run(tuning=name, learning_rate=None if name == BASE else PEFT_LEARNING_RATE)
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
    """Peak resident set size of this process (``ru_maxrss``: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as e:
        open("/tmp/peftbench/dbg.log", "a").write(f"OSError {e}\n")
        return False
    open("/tmp/peftbench/dbg.log", "a").write(f"{peak_rss_bytes()} {rss_bytes()}\n")
    return peak_rss_bytes() <= rss_bytes() + MIB  # ru_maxrss follows the reset


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
    seen = Observed()
    with contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO()):
        step_time.timed_train(setup, run, args, out.with_name(out.name + "-warm"), args.warmup)
        step_time.timed_train(setup, run, args, out, args.warmup, lambda t: rss_probe(t, seen))
    print(MEMORY_MARK + json.dumps({"growth": seen.peak[0], "reset": seen.reset}))
    return 0


def measure_memory_apart(argv: list[str], setup_file: Path, name: str) -> tuple[int, bool]:
    """(RSS growth in bytes, high-water mark reset) of ``name``, measured in a fresh process."""
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
    return int(result["growth"]), bool(result["reset"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.measure_memory:
        return measure_memory_here(args)
    step_time.start(args)
    import torch

    wall = time.perf_counter()
    runs = configurations(args)
    seen = {name: Observed() for name in runs}
    resets: list[bool] = []
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
                growth, reset = measure_memory_apart(argv, setup_file, name)
                seen[name].peak.append(growth)
                resets.append(reset)

    clock = step_time.resolve_clock(args, setup.device)
    other = "wall" if clock == "cpu" else "cpu"
    names = list(runs)
    medians = {
        c: {n: statistics.median(1000 * t[c] for t in times[n]) for n in names} for c in step_time.CLOCKS
    }
    peak = {name: max(seen[name].peak) / MIB for name in names}
    threads = torch.get_num_threads()
    n_bank = int(0.2 * args.batch_size)
    steps = f"(train({args.warmup + args.steps}) - train({args.warmup})) / {args.steps}"
    if cuda:
        memory = (
            "peak allocated CUDA memory during train() (max_memory_allocated after reset_peak_memory_stats)"
        )
    else:
        how = "high-water mark reset before train()" if all(resets) else "NO high-water reset: upper bounds"
        memory = (
            f"peak RSS growth during train(): ru_maxrss after - RSS before ({how}); "
            f"a fresh process per configuration, after one warm-up train({args.warmup})"
        )
    cpu_threads = f" ({threads} thread{'s' if threads > 1 else ''})" if setup.device == "cpu" else ""
    print(
        "difftune PEFT benchmark: tuning methods vs full fine-tuning, LoRA distillation vs LoRA (Trainer.train)"
    )
    print(f"model    {args.size}: {setup.description}")
    print(
        f"device   {setup.device}{cpu_threads}; global batch {args.batch_size} ({args.batch_size - n_bank} target "
        f"+ {n_bank} bank); Diff-Tuning objective defaults; lr {PEFT_LEARNING_RATE:g} (full: train default)"
    )
    print(f"timing   {step_time.CLOCK_NAMES[clock]}; {args.repeats} interleaved repeats of {steps} steps")
    print(f"memory   {memory}")

    def row(name: str, base: str) -> str:
        s, ms = seen[name], [1000 * t[clock] for t in times[name]]
        return (
            f"{name:<18}{s.trainable:>12,}{100 * s.share:>8.2f}%{medians[clock][name]:>11.2f}"
            f"{step_time.iqr(ms):>8.2f}{peak[name]:>10.2f}"
            f"{medians[clock][name] / medians[clock][base]:>10.3f}{peak[name] / peak[base]:>10.3f}"
        )

    def header(base: str) -> str:
        return (
            f"{'method':<18}{'trainable':>12}{'share':>9}{'ms/step':>11}{'IQR ms':>8}{'peak MiB':>10}"
            f"{'time/' + base:>10}{'mem/' + base:>10}"
        )

    print()
    print("methods (Diff-Tuning objective; ratios: method / full fine-tuning)")
    print(header(BASE))
    for name in names:
        if name != DISTILLED:
            print(row(name, BASE))
    print()
    print(
        "distillation with a LoRA student vs the same LoRA run with Diff-Tuning retention (no distillation)"
    )
    print(header(STUDENT))
    for name in (STUDENT, DISTILLED):
        print(row(name, STUDENT))
    per_repeat = [d[clock] / s[clock] for d, s in zip(times[DISTILLED], times[STUDENT], strict=True)]
    print("per-repeat step-time ratios  " + " ".join(f"{x:.3f}" for x in per_repeat))
    print(
        f"median of per-repeat ratios {statistics.median(per_repeat):.3f} (IQR {step_time.iqr(per_repeat):.3f}); "
        f"{step_time.CLOCK_NAMES[other]} (cross-check) ratio "
        f"{medians[other][DISTILLED] / medians[other][STUDENT]:.3f}"
    )
    print(f"wall time {time.perf_counter() - wall:.0f} s")
    print(
        f"distillation/lora ratios: memory {peak[DISTILLED] / peak[STUDENT]:.3f} (target <= 1.05), "
        f"step time {medians[clock][DISTILLED] / medians[clock][STUDENT]:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
