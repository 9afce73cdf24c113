"""Step-time overhead of Diff-Tuning over plain fine-tuning, through the real training loop.

Diff-Tuning mixes target samples (t drawn toward high noise) and knowledge-bank samples (t drawn
toward low noise) in ONE forward pass, so at equal global batch a step should cost about as much
as a plain fine-tuning step. This script measures that claim with :class:`difftune.training.loop.Trainer`
itself, nothing re-implemented:

* one random-init class-conditional DiT is built from a config and saved to a temporary directory
  (``--size``); its knowledge bank is generated once (few samples, few sampling steps);
* the target is scikit-learn's digits 5-9 (``data.source=digits``), encoded once into a shared cache;
* the two methods use configs that differ only in the ``objective`` section: Diff-Tuning defaults
  (``power_up`` / ``power_down``, ``bank_share=0.2``, ``bank_weight=0.1``) and plain fine-tuning
  (``target_schedule=uniform``, ``bank_share=0``); same model, data, seed, global batch, EMA;
* the trainer is not instrumented. Each measurement times ``Trainer.train()`` end to end (fresh
  trainer, ``checkpoint_every=0`` so it checkpoints once, at the end) for ``warmup`` steps and for
  ``warmup + steps`` steps; the difference divided by ``steps`` is the per-step time. Everything paid
  once per run (optimizer and EMA set-up, accelerate ``prepare``, trackers, the final checkpoint,
  the final log line) cancels in the difference;
* repeats interleave the methods, in alternating order (plain, diff-tuning, diff-tuning, plain, ...),
  so slow drift of the machine hits both alike; one discarded short run of each comes first;
* on the CPU, torch runs one intra-op thread by default (``--threads``): with several threads on a
  machine shared with other work, OpenMP barriers waiting on a descheduled thread make whole runs
  many times slower at random, which swamps a few-percent effect. A one-thread CPU run reports
  process CPU time (``--clock auto``), which does not count the time the process waits for a core
  while other work runs; wall-clock figures are printed beside it. GPU runs use the wall clock,
  with CUDA synchronised before and after each timed ``train()``.

Printed: a table (median ms/step and IQR over repeats per method), the per-repeat ratios, the
other clock's medians and ratio, the wall time, and on the LAST line ``ratio <value>``: median Diff-Tuning step time / median plain step time. 1.000 means
no overhead; the target is at most 1.05 (the bank stream costs nothing but a few index and mask
operations; the forward/backward work is the same at equal batch).

Usage (from the repository root, with the project's venv active)::

    python benchmarks/step_time.py                          # small DiT, 1-1.5 min on a 2-core CPU
    python benchmarks/step_time.py --size tiny --repeats 15  # loop-overhead dominated
    python benchmarks/step_time.py --size dit-s --device cuda --steps 50 --batch-size 64

Options: ``--size {tiny,small,dit-s}``, ``--device {auto,cpu,cuda}``, ``--steps``, ``--warmup``,
``--batch-size``, ``--repeats``, ``--threads``, ``--clock {auto,wall,cpu}``, ``--bank-samples``,
``--bank-steps``, ``--seed``, ``--keep`` (keep the temporary directory), ``--verbose``.

Reading it: a single run's ratio moves by a few percent on a busy machine (see the per-repeat
ratios); run it again, or raise ``--repeats`` / ``--steps``, before calling a small change real.

``benchmarks/peft_bench.py`` reuses this module's pieces (options, source model and bank, a run
described by :class:`Run`, :func:`measure` with a probe around each timed ``train()``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from difftune.config.experiment import ExperimentConfig
    from difftune.training.loop import Trainer

# the random-init source model, patch size 2: "tiny" is the test suite's DiT; "small" (default) a
# hidden-128, 4-layer DiT on the digits' native 8x8 pixels; "dit-s" DiT-S/2 (hidden 384, depth 12)
# on 4x16x16 latents of a tiny random VAE (128 px images), which exercises the latent path (meant
# for a GPU: seconds per step on a small CPU)
SIZES: dict[str, dict[str, int | bool]] = {
    "tiny": {"heads": 2, "head_dim": 8, "layers": 2, "sample": 8, "channels": 1, "latent": False},
    "small": {"heads": 4, "head_dim": 32, "layers": 4, "sample": 8, "channels": 1, "latent": False},
    "dit-s": {"heads": 6, "head_dim": 64, "layers": 12, "sample": 16, "channels": 4, "latent": True},
}
METHODS: dict[str, dict[str, object]] = {
    "plain": {"target_schedule": "uniform", "bank_share": 0.0},
    "diff-tuning": {},  # the ObjectiveConfig defaults are Diff-Tuning's
}
TARGET_CLASSES = [5, 6, 7, 8, 9]


def add_arguments(
    p: argparse.ArgumentParser,
    *,
    size: str = "small",
    steps: int = 40,
    repeats: int = 9,
    batch_help: str = "global batch (target + bank), equal for both",
) -> None:
    """The options of a step-time benchmark (this script's; ``benchmarks/peft_bench.py`` adds its own)."""
    p.add_argument(
        "--size", choices=sorted(SIZES), default=size, help="source DiT size (default %(default)s)"
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available"
    )
    p.add_argument("--steps", type=int, default=steps, help="timed optimiser steps per measurement")
    p.add_argument(
        "--warmup", type=int, default=3, help="steps of the short run subtracted from the long one"
    )
    p.add_argument("--batch-size", type=int, default=32, help=batch_help)
    p.add_argument("--repeats", type=int, default=repeats, help="measurements per method (interleaved)")
    p.add_argument("--bank-samples", type=int, default=64, help="knowledge-bank size")
    p.add_argument("--bank-steps", type=int, default=4, help="sampling steps used to generate the bank")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op CPU threads (default 1: robust to other load on the machine; 0 = torch's default)",
    )
    p.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="clock of the reported ratio: wall, or process CPU time (auto: cpu on a 1-thread CPU run, else wall)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    p.add_argument("--verbose", action="store_true", help="let library warnings and progress bars through")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args``, or exit through ``p.error`` on a count that cannot be measured."""
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1 or args.batch_size < 2:
        p.error("--steps, --warmup and --repeats must be >= 1 and --batch-size >= 2")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    return check_args(p, p.parse_args(argv))


def quiet_environment(args: argparse.Namespace) -> None:
    """Set before torch, diffusers or tqdm are imported (tqdm reads TQDM_* when it is imported)."""
    if not args.verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # tensorboard's writer may import TensorFlow
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # so that accelerate (inside Trainer) picks the CPU too


def start(args: argparse.Namespace) -> None:
    """Quiet the libraries, then import torch and set its CPU threads and matmul precision."""
    quiet_environment(args)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")  # as the difftune CLI does


@contextlib.contextmanager
def scratch(args: argparse.Namespace, prefix: str) -> Iterator[Path]:
    """A temporary directory, removed on the way out unless ``--keep`` (then its path is printed)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


@dataclass
class Setup:
    source: Path
    bank: Path
    cache: Path
    description: str
    device: str


def build_source(root: Path, size: str, seed: int) -> tuple[Path, str]:
    """A random-init class-conditional DiT (+ tiny VAE for latents) saved as a pipeline-like directory."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    s = SIZES[size]
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=s["heads"],
        attention_head_dim=s["head_dim"],
        in_channels=s["channels"],
        out_channels=2 * s["channels"],
        num_layers=s["layers"],
        sample_size=s["sample"],
        patch_size=2,
        num_embeds_ada_norm=len(TARGET_CLASSES),
        norm_num_groups=1,
    )
    model.save_pretrained(root / "transformer")
    DDPMScheduler().save_pretrained(root / "scheduler")
    space = f"{s['channels']}x{s['sample']}x{s['sample']} pixels"
    if s["latent"]:
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=s["channels"],
            block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=4,
            layers_per_block=1,
            sample_size=8 * s["sample"],
        )
        vae.save_pretrained(root / "vae")
        space = f"{s['channels']}x{s['sample']}x{s['sample']} latents of {8 * s['sample']} px images"
    params = sum(p.numel() for p in model.parameters())
    hidden = s["heads"] * s["head_dim"]
    tokens = (s["sample"] // 2) ** 2
    return (
        root,
        f"DiT hidden {hidden}, {s['layers']} layers, {tokens} tokens, {space}, {params / 1e6:.2f}M params",
    )


def prepare(
    args: argparse.Namespace,
    work: Path,
    build: Callable[[Path, str, int], tuple[Path, str]] = build_source,
) -> Setup:
    """The source model (``build(root, args.size, args.seed)``: its directory and a description), its
    knowledge bank generated once, and the target cache's directory."""
    import torch

    from difftune.backbones import load_pretrained
    from difftune.bank import generate_bank
    from difftune.config.experiment import BankConfig
    from difftune.config.sampling import SamplingSpec

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{Path(sys.argv[0]).name}: --device cuda but CUDA is not available")
    source, description = build(work / "source", args.size, args.seed)
    bank = work / "bank"
    bank_cfg = BankConfig(
        path=str(bank),
        num_samples=args.bank_samples,
        sampling=SamplingSpec(steps=args.bank_steps, seed=args.seed),
        shard_size=args.bank_samples,
        batch_size=args.bank_samples,
    )
    generate_bank(load_pretrained(str(source)), bank_cfg, device=device, progress=args.verbose)
    return Setup(source, bank, work / "target_cache", description, device)


@dataclass(frozen=True)
class Run:
    """What one measured configuration changes: ``objective`` settings, the ``tuning`` section (its
    ``method`` and settings) and the learning rate (``None``: the ``train`` default). This script's two methods differ
    only in ``objective``; everything else (model, data, bank, batch, seed, EMA) is shared. ``data``
    replaces settings of the ``data`` section (default: digits 5-9, cached in ``Setup.cache``);
    ``model`` adds settings of the ``model`` section (e.g. ``controlnet``) and ``train`` of the
    ``train`` section (e.g. ``ema_decay``, ``mixed_precision``)."""

    objective: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)
    learning_rate: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


def make_config(
    setup: Setup, run: Run, args: argparse.Namespace, out: Path, max_steps: int
) -> ExperimentConfig:
    """The experiment config of one run of ``run``."""
    from difftune.config.experiment import (
        BankConfig,
        DataConfig,
        ExperimentConfig,
        ModelConfig,
        TrainConfig,
        section_from_dict,
    )
    from difftune.config.sampling import SamplingSpec

    rate = {} if run.learning_rate is None else {"learning_rate": run.learning_rate}
    return ExperimentConfig(
        model=ModelConfig(pretrained=str(setup.source), **run.model),
        data=DataConfig(
            **{
                "source": "digits",
                "classes": TARGET_CLASSES,
                "cache_dir": str(setup.cache),
                "seed": args.seed,
                **run.data,
            }
        ),
        bank=BankConfig(
            path=str(setup.bank), num_samples=args.bank_samples, sampling=SamplingSpec(steps=args.bank_steps)
        ),
        objective=section_from_dict("objective", run.objective),
        tuning=section_from_dict("tuning", run.tuning),
        train=TrainConfig(
            output_dir=str(out),
            batch_size=args.batch_size,
            max_steps=max_steps,
            seed=args.seed,
            checkpoint_every=0,
            keep_checkpoints=1,
            log_every=10**9,  # one checkpoint, one log: at the end
            **rate,
            **run.train,
        ),
    )


CLOCKS = ("wall", "cpu")  # time.perf_counter, time.process_time
CLOCK_NAMES = {"wall": "wall clock", "cpu": "process CPU time"}
# wraps each timed Trainer.train() call (entered after construction, left before clean-up, its own
# work outside the clocks): how a caller observes a run, e.g. its peak memory
Probe = Callable[["Trainer"], contextlib.AbstractContextManager[object]]


def timed_train(
    setup: Setup, run: Run, args: argparse.Namespace, out: Path, max_steps: int, probe: Probe | None = None
) -> tuple[float, float]:
    """(wall, process CPU) seconds of one ``Trainer.train()`` call; construction and clean-up excluded."""

    from difftune.training.loop import Trainer

    cuda = setup.device == "cuda"
    # the trainer's bars (and the target encoder's) pass disable= explicitly, so TQDM_DISABLE cannot
    # silence them; their output goes to a buffer instead (formatting it costs both methods alike)
    with contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(io.StringIO()):
        trainer = Trainer(make_config(setup, run, args, out, max_steps))
        with contextlib.nullcontext() if probe is None else probe(trainer), clocks(cuda) as spent:
            trainer.train()
    del trainer
    shutil.rmtree(out, ignore_errors=True)
    return spent[0], spent[1]


@contextlib.contextmanager
def clocks(cuda: bool) -> Iterator[list[float]]:
    """Time the block on both clocks: yields a list that holds ``[wall, process CPU]`` seconds after it.

    The garbage collector is run before and kept off during the block (as :mod:`timeit` does): a
    full collection of a large heap, such as a test process's, costs tens of milliseconds of CPU and
    would land in whichever run it happened to fall in. CUDA is synchronised at both ends.
    """
    import torch

    spent: list[float] = []
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        yield spent
        if cuda:
            torch.cuda.synchronize()
        spent.extend((time.perf_counter() - wall, time.process_time() - cpu))
    finally:
        if enabled:
            gc.enable()


def step_seconds(
    setup: Setup, run: Run, args: argparse.Namespace, work: Path, tag: str, probe: Probe | None = None
) -> dict[str, float]:
    """Per-step seconds on each clock: (train(warmup + steps) - train(warmup)) / steps, fresh trainers."""
    short = timed_train(setup, run, args, work / f"run-{tag}-short", args.warmup, probe)
    long = timed_train(setup, run, args, work / f"run-{tag}-long", args.warmup + args.steps, probe)
    return {clock: (b - a) / args.steps for clock, a, b in zip(CLOCKS, short, long, strict=True)}


def measure(
    setup: Setup,
    runs: dict[str, Run],
    args: argparse.Namespace,
    work: Path,
    probe: Callable[[str], Probe] | None = None,
) -> dict[str, list[dict[str, float]]]:
    """Per-step seconds of every run, ``args.repeats`` times each (:func:`step_seconds`).

    One discarded short run of each comes first (imports, allocator, caches, target encoding); then
    the repeats interleave the runs, in alternating order (a, b, ..., z, z, ..., b, a, ...), so slow
    drift of the machine hits all alike. ``probe(name)`` wraps each timed ``train()`` of ``name``.
    """
    names = list(runs)
    for name in names:
        timed_train(setup, runs[name], args, work / f"run-discard-{name}", args.warmup)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(
                step_seconds(
                    setup, runs[name], args, work, f"{r}-{name}", None if probe is None else probe(name)
                )
            )
    return times


def resolve_clock(args: argparse.Namespace, device: str) -> str:
    """The clock of the reported figures: ``--clock``, or for ``auto`` CPU time on a 1-thread CPU run."""
    import torch

    if args.clock != "auto":
        return args.clock
    return "cpu" if device == "cpu" and torch.get_num_threads() == 1 else "wall"


def ratio(ours: float, theirs: float) -> float:
    """``ours / theirs``, or NaN unless both times came out positive (a difference of two runs can fall
    at or below 0 when the steps are shorter than the runs' noise)."""
    return ours / theirs if ours > 0 and theirs > 0 else math.nan


INCONCLUSIVE = (
    "timing   inconclusive: {} came out at or below 0 ms/step, the steps are shorter than the run-to-run "
    "noise of a whole train() call; raise --steps or --repeats (exit 1)"
)


def iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start(args)
    import torch

    wall = time.perf_counter()
    with scratch(args, "difftune-step-time-") as work:
        setup = prepare(args, work)
        names = list(METHODS)
        times = measure(setup, {name: Run(objective=METHODS[name]) for name in names}, args, work)

    threads = torch.get_num_threads()
    clock = resolve_clock(args, setup.device)
    other = "wall" if clock == "cpu" else "cpu"
    n_bank = int(0.2 * args.batch_size)
    steps = f"(train({args.warmup + args.steps}) - train({args.warmup})) / {args.steps}"
    print("difftune step time, Diff-Tuning vs plain fine-tuning (real Trainer.train loop)")
    print(f"model    {args.size}: {setup.description}")
    cpu_threads = f" ({threads} thread{'s' if threads > 1 else ''})" if setup.device == "cpu" else ""
    print(
        f"device   {setup.device}{cpu_threads}; "
        f"global batch {args.batch_size} (diff-tuning: {args.batch_size - n_bank} target + {n_bank} bank; "
        f"plain: {args.batch_size} target)"
    )
    print(f"timing   {CLOCK_NAMES[clock]}; {args.repeats} interleaved repeats of {steps} steps")
    print()
    print(f"{'method':<13}{'median ms/step':>16}{'IQR ms':>10}   per-repeat ms/step")
    medians: dict[str, dict[str, float]] = {c: {} for c in CLOCKS}
    for name in names:
        for c in CLOCKS:
            medians[c][name] = statistics.median(1000 * t[c] for t in times[name])
        ms = [1000 * t[clock] for t in times[name]]
        print(
            f"{name:<13}{medians[clock][name]:>16.2f}{iqr(ms):>10.2f}   " + " ".join(f"{v:.1f}" for v in ms)
        )
    per_repeat = [
        ratio(d[clock], p[clock]) for d, p in zip(times["diff-tuning"], times["plain"], strict=True)
    ]
    print()
    print("per-repeat ratios  " + " ".join(f"{x:.3f}" for x in per_repeat))
    print(
        f"median of per-repeat ratios {statistics.median(per_repeat):.3f} (IQR {iqr(per_repeat):.3f}); target <= 1.05"
    )
    m = medians[other]
    print(
        f"{CLOCK_NAMES[other]} (cross-check): plain {m['plain']:.2f}, diff-tuning {m['diff-tuning']:.2f} ms/step, "
        f"ratio {ratio(m['diff-tuning'], m['plain']):.3f}"
    )
    print(f"wall time {time.perf_counter() - wall:.0f} s")
    inconclusive = [name for name in names if medians[clock][name] <= 0]
    if inconclusive:
        print(INCONCLUSIVE.format(" and ".join(inconclusive)))
    print(f"ratio {ratio(medians[clock]['diff-tuning'], medians[clock]['plain']):.3f}")
    return 1 if inconclusive else 0


if __name__ == "__main__":
    raise SystemExit(main())
