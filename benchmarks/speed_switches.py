"""The speed switches of the ``train`` section side by side: steady step time, compile warm-up, peak
memory and optimiser state of each, against the defaults, in one run.

What is measured: the real :class:`difftune.training.loop.Trainer` (Diff-Tuning objective defaults,
full fine-tuning, EMA on, as ``benchmarks/step_time.py`` configures it), once per row, each row a
fresh process that differs from its model's default row only in the ``train`` settings named:

=======================  ==========================================  ==================================
row                      ``train`` settings                          model
=======================  ==========================================  ==================================
``default``              (defaults: ``adamw``, no compile, fp32)     DiT (``--size``, default DiT-S/2)
``adamw_fused``          ``optimizer: adamw_fused``                  DiT
``adamw_8bit``           ``optimizer: adamw_8bit`` (bitsandbytes)    DiT
``compile_regional``     ``compile: regional``                       DiT
``compile_full``         ``compile: full``                           DiT
``sdpa_math``            ``sdpa_backend: math``                      DiT
``bf16``                 ``mixed_precision: bf16``                   DiT
``grad_ckpt``            ``gradient_checkpointing: true``            DiT
``unet_default``         (defaults)                                  UNet
``unet_channels_last``   ``channels_last: true``                     UNet
``unet_compile_regional``  ``compile: regional``                     UNet
=======================  ==========================================  ==================================

The DiT is ``step_time.py``'s random-init source (``--size dit-s``: DiT-S/2, hidden 384, 12 layers,
64 tokens of 4x16x16 latents of 128 px images through a tiny random VAE, 35M parameters); the UNet
a random-init class-conditional ``UNet2DModel`` on 3x32x32 pixels (blocks 64/128/128 of 2 ResNet
layers, attention only in the mid block, 6.1M parameters). Both get a knowledge bank generated once
and digits 5-9 as the target, encoded once into a shared cache (``step_time.prepare``).
``train.allow_tf32`` is left at its default (on): it changes nothing on a CPU.

How:

* step time: every row is its own process (this script re-invoked with a hidden ``--child`` flag),
  which builds one trainer and runs ``train()`` for ``warmup + steps + 1`` steps. From outside, the
  trainer's ``_optimizer_step`` is wrapped to take a timestamp as each step begins (nothing else is
  changed); the interval between two starts is one whole loop iteration (batch, forward, backward,
  optimiser step, EMA update, bookkeeping). The first ``--warmup`` intervals are the warm-up (the
  first forward, and with ``compile`` the whole compilation, which ``torch.compile`` does lazily in
  the first steps); the next ``--steps`` intervals are the steady state, reported as their median
  (and IQR). The extra ``+ 1`` step only closes the last interval; set-up, the final checkpoint and
  ``final/`` are outside every interval. A difference of two ``train()`` calls, as step_time.py
  takes, would not cancel the compilation here: a second compile in the same process is served
  from the caches the first one filled;
* warm-up: wall-clock seconds of the warm-up intervals minus ``warmup`` steady steps (wall), i.e.
  what the first steps cost beyond ordinary steps: for the compile rows the compilation, most of
  which runs in inductor's compiler subprocesses (hence the wall clock); each process starts with
  an empty inductor cache of its own (``TORCHINDUCTOR_CACHE_DIR``), so the compilation is cold;
* clock: as step_time.py, a one-thread CPU run reports process CPU time (``--clock auto``; it does
  not count the time the process waits for a core while other work runs), the wall clock beside it;
  a GPU run the wall clock, with CUDA synchronised at every timestamp;
* peak memory on the CPU: ``peft_bench.py``'s probe (``VmHWM`` after ``clear_refs``: the growth of the
  resident set's high-water mark during ``train()`` over the resident set just before), in a second
  fresh process per row that runs ``train(2)`` (the second step's backward holds activations,
  gradients and the optimiser's moments at once) with ``peft_bench.CHILD_MALLOC`` (glibc gives freed
  buffers back, so the resident set follows live memory). That glibc setting makes steps markedly
  slower, which is why the memory and the timing are separate processes. The growth is what
  ``train()`` adds to the loaded model and the cached data: gradients, optimiser state, the EMA,
  activations, the compiler's work for the compile rows (its kernels come from the cache the
  timing process filled) and the final checkpoint's buffers; the ``steps`` column is the same
  growth up to the end of the last step (the high-water mark read there), without the checkpoint.
  Modules the switches import lazily (bitsandbytes, ``torch._dynamo``/``torch._inductor``, the
  tensorboard writer) are imported before the trainer is built in every child, so no row counts an
  import. On CUDA the memory is ``max_memory_allocated()`` during ``train()`` in the timing process
  (``peft_bench.cuda_probe``), an absolute peak that includes the weights;
* optimiser state: the bytes of the tensors in the optimiser's state after training (distinct
  storages: bitsandbytes shares its quantisation maps), and the size of the checkpoint's
  ``optimizer.bin`` beside them.

Printed: a header (date, versions, CPU, threads, models, batch, how each figure is taken); the table
(per row: steady ms/step median and IQR on the reported clock, the other clock's median, warm-up
extra seconds, peak memory growth, optimiser state and its file); then one line per switch
``ratio <row>/<default row> step <r> memory <m>`` (median step time and peak memory over those of the
same model's default row); and last ``ratio adamw_8bit/adamw optimizer_state <x>``. A row whose run
fails (a switch that cannot train that model with this torch) is shown as ``failed:`` with the
child's last error line, and its ratios as ``failed``; the other rows go on (a failing default row
stops the run: it is every ratio's base).

Usage (from the repository root, with the project's venv active)::

    python benchmarks/speed_switches.py                    # all 11 rows, DiT-S/2, batch 8: ~9-10 min, 2-core CPU
    python benchmarks/speed_switches.py --only adamw_8bit bf16 --json speed.json   # + the default row: ~3 min
    python benchmarks/speed_switches.py --size tiny --steps 3 --only compile_regional  # script check: ~2 min
    python benchmarks/speed_switches.py --device cuda --batch-size 64 --steps 50

The minutes are those of a 2-core CPU with other work on the second core: the fixed costs of a
row (a fresh process, the trainer's set-up, the final checkpoint of 35M parameters, the memory
process) weigh as much as its steps, and the compile rows add their compilation. ``--size`` changes only the DiT; the UNet rows stay as they are.

Options: ``--only ROW ...`` (the rows to measure; each model's default row, the base of the ratios,
always runs), ``--json PATH`` (every row's figures, per-step times and the environment), and those
of step_time.py that apply: ``--size {tiny,small,dit-s}``, ``--device``, ``--steps`` (default 6),
``--warmup`` (3), ``--batch-size`` (8), ``--repeats`` (timing processes per row, alternating order,
intervals pooled; default 1; memory is measured once), ``--threads`` (1), ``--clock``,
``--bank-samples``, ``--bank-steps``, ``--seed``, ``--keep``, ``--verbose``.

Reading it: CPU figures say little about a GPU. On a CPU ``adamw_8bit`` runs bitsandbytes' CPU
kernels, ``bf16`` depends on the CPU's bf16 units (AMX / AVX-512 BF16), ``sdpa_math`` against the CPU's
fused attention, and ``channels_last`` against oneDNN's choice of layout; ``allow_tf32``, ``flash``
and ``cudnn`` attention need a GPU; ``compile`` on a CPU is inductor's C++ backend (it needs a
C++ compiler). A busy machine moves one row's step time by a few percent (see
the IQR), the wall-clock warm-up by more; run again, or raise ``--steps`` / ``--repeats``, before
calling a small difference real.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peft_bench  # noqa: E402
import step_time  # noqa: E402

if TYPE_CHECKING:
    from difftune.config.experiment import ExperimentConfig
    from difftune.training.loop import Trainer

MIB = 2**20
# steps of a memory process: the second one's backward holds activations, gradients and moments at once
MEMORY_STEPS = 2
MARK = "speed-switches "  # a child's result line on its stdout: this mark, then JSON


@dataclasses.dataclass(frozen=True)
class Row:
    """One measured configuration: the model it trains and its ``train`` settings over the defaults."""

    model: str  # "dit" or "unet"
    train: dict[str, Any]


ROWS: dict[str, Row] = {
    "default": Row("dit", {}),
    "adamw_fused": Row("dit", {"optimizer": "adamw_fused"}),
    "adamw_8bit": Row("dit", {"optimizer": "adamw_8bit"}),
    "compile_regional": Row("dit", {"compile": "regional"}),
    "compile_full": Row("dit", {"compile": "full"}),
    "sdpa_math": Row("dit", {"sdpa_backend": "math"}),
    "bf16": Row("dit", {"mixed_precision": "bf16"}),
    "grad_ckpt": Row("dit", {"gradient_checkpointing": True}),
    "unet_default": Row("unet", {}),
    "unet_channels_last": Row("unet", {"channels_last": True}),
    "unet_compile_regional": Row("unet", {"compile": "regional"}),
}
BASES = {"dit": "default", "unet": "unet_default"}  # the row each switch of a model is divided by
EIGHT_BIT, THIRTY_TWO_BIT = "adamw_8bit", "default"  # the last line's optimiser-state ratio
# imported by some switches inside train(): imported first in every child, so that no row's memory
# growth counts an import (bitsandbytes: adamw_8bit; dynamo/inductor: compile; tensorboard: all)
LAZY_IMPORTS = ("bitsandbytes", "torch._dynamo", "torch._inductor.compile_fx", "torch.utils.tensorboard")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    step_time.add_arguments(
        p, size="dit-s", steps=6, repeats=1, batch_help="global batch (target + bank), equal for all rows"
    )
    p.set_defaults(batch_size=8)  # DiT-S/2 on a CPU: about a second per step
    p.add_argument(
        "--only",
        nargs="+",
        metavar="ROW",
        choices=list(ROWS),
        help=f"rows to measure (default all: {', '.join(ROWS)}); each model's default row always runs",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write every row's figures to PATH")
    # internal: one row's measurement in this (fresh) process; see the docstring
    p.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)
    p.add_argument("--role", choices=["time", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return step_time.check_args(p, p.parse_args(argv))


def selected_rows(args: argparse.Namespace) -> list[str]:
    """``--only``'s rows (all by default) and the default row of each of their models, in table order."""
    chosen = set(args.only or ROWS)
    chosen |= {BASES[ROWS[name].model] for name in chosen}
    return [name for name in ROWS if name in chosen]


# ---------------------------------------------------------------------------------------------------
# set-up (parent)


def build_unet_source(root: Path, size: str, seed: int) -> tuple[Path, str]:
    """A random-init class-conditional UNet2DModel on 3x32x32 pixels, saved as a pipeline-like
    directory: ``step_time.build_source``'s counterpart for the UNet rows (``size`` is not used)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        norm_num_groups=32,
        num_class_embeds=len(step_time.TARGET_CLASSES) + 1,  # + the null label row
    )
    model.save_pretrained(root / "unet")
    DDPMScheduler().save_pretrained(root / "scheduler")
    params = sum(p.numel() for p in model.parameters())
    return (
        root,
        f"UNet2DModel blocks (64, 128, 128) x 2 layers, mid-block attention at 8x8, 3x32x32 pixels, "
        f"{params / 1e6:.2f}M params",
    )


def prepare(args: argparse.Namespace, work: Path, models: set[str]) -> dict[str, step_time.Setup]:
    """Each model's source, bank and target cache directory (``step_time.prepare``; the UNet's source
    from :func:`build_unet_source`)."""
    setups = {}
    if "dit" in models:
        setups["dit"] = step_time.prepare(args, work / "dit")
    if "unet" in models:
        setups["unet"] = step_time.prepare(args, work / "unet", build_unet_source)
    return setups


# ---------------------------------------------------------------------------------------------------
# one row's measurement (child)


def make_config(
    setup: step_time.Setup, row: Row, args: argparse.Namespace, out: Path, max_steps: int
) -> ExperimentConfig:
    """``step_time.make_config``'s config (Diff-Tuning defaults, full tuning, EMA) with the row's
    ``train`` settings, checked again by ``TrainConfig``."""
    cfg = step_time.make_config(setup, step_time.Run(), args, out, max_steps)
    cfg.train = dataclasses.replace(cfg.train, **row.train)
    return cfg


class StepClock:
    """Timestamps (wall, process CPU) at the start of every optimiser step of a trainer's ``train()``,
    and with ``memory`` the peak memory so far at the end of each.

    It wraps the trainer's ``_optimizer_step`` from outside (an instance attribute): the loop runs as
    it is, and two clock readings (with a CUDA synchronisation on a GPU) are all that is added to a
    timed step; the memory reading (``VmHWM``, or CUDA's peak allocated) comes after the step.
    """

    def __init__(self, trainer: Trainer, cuda: bool, memory: bool) -> None:
        import torch

        self.marks: list[tuple[float, float]] = []
        self.peak_after_steps = 0  # the high-water mark (CUDA: peak allocated) after the last step
        inner = trainer._optimizer_step

        def step(*a: Any, **k: Any) -> float:
            if cuda:
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), time.process_time()))
            rate = inner(*a, **k)
            if memory:
                self.peak_after_steps = (
                    torch.cuda.max_memory_allocated() if cuda else peft_bench.peak_rss_bytes()
                )
            return rate

        trainer._optimizer_step = step  # type: ignore[method-assign]


def optimizer_state_bytes(trainer: Trainer) -> int:
    """Bytes of the tensors in the trained optimiser's state, each storage once."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    storages: dict[int, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if hasattr(value, "untyped_storage"):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def optimizer_file_bytes(out: Path) -> int:
    """Size of the optimiser state file(s) in the run's last checkpoint (accelerate's ``optimizer.bin``)."""
    state = sorted((out / "checkpoints").iterdir())[-1] / "state"
    return sum(f.stat().st_size for f in state.glob("optimizer*"))


def child(args: argparse.Namespace) -> int:
    """The hidden ``--child ROW --role {time,memory}`` mode: one row's run in this fresh process."""
    import importlib

    step_time.start(args)
    import torch

    from difftune.training.loop import Trainer

    for module in LAZY_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    raw = json.loads(args.setup.read_text())[ROWS[args.child].model]
    setup = step_time.Setup(
        Path(raw["source"]), Path(raw["bank"]), Path(raw["cache"]), raw["description"], raw["device"]
    )
    cuda = setup.device == "cuda"
    timing = args.role == "time"
    steps = args.warmup + args.steps + 1 if timing else MEMORY_STEPS
    cfg = make_config(setup, ROWS[args.child], args, args.out, steps)
    seen = peft_bench.Observed()
    quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(io.StringIO())
    # the trainer prints its run summary on stdout, its bars on stderr: the result line is ours alone
    with quiet, contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg)
        clock = StepClock(trainer, cuda, memory=cuda or not timing)
        probe: Callable[[Trainer, peft_bench.Observed], contextlib.AbstractContextManager[None]]
        probe = peft_bench.cuda_probe if cuda else peft_bench.rss_probe
        if timing and not cuda:
            probe = peft_bench.summary_probe  # CPU memory: the memory process
        with probe(trainer, seen):
            trainer.train()
        # the probe's last reading, read again: the high-water mark at the end of train()
        end = peft_bench.peak_rss_bytes()
    if not seen.peak:
        steps_peak = None
    elif cuda:
        steps_peak = clock.peak_after_steps
    else:  # the growth up to the end of the last step: the whole growth less the rise after it
        steps_peak = seen.peak[-1] - (end - clock.peak_after_steps)
    result = {
        "marks": clock.marks,
        "peak": seen.peak[-1] if seen.peak else None,
        "steps_peak": steps_peak,
        "reset": seen.reset,
        "trainable": seen.trainable,
        "optimizer_state": optimizer_state_bytes(trainer),
        "optimizer_file": optimizer_file_bytes(args.out),
        "threads": torch.get_num_threads(),
    }
    print(MARK + json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------
# the run (parent)


def run_child(
    argv: list[str],
    name: str,
    role: str,
    setup_file: Path,
    out: Path,
    inductor: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One row's ``role`` measurement in a fresh process: its result, or ``{"error": <the child's last
    error line>}`` when the run failed (a switch that cannot train this model is a result too)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if role == "memory":
        env.update(peft_bench.CHILD_MALLOC)
    command = [sys.executable, __file__, *argv, "--child", name, "--role", role]
    command += ["--setup", str(setup_file), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode == 0 and lines:
        return json.loads(lines[-1][len(MARK) :])
    said = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in said if "Error" in line or "Exception" in line] or said or ["no output"]
    if args.verbose:
        sys.stderr.write(done.stderr[-4000:])
    return {"error": f"exit {done.returncode}: {errors[-1][:200]}"}


@dataclasses.dataclass
class Figures:
    """One row's measurements, pooled over its timing processes."""

    steady: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {"wall": [], "cpu": []})
    warmup: list[list[float]] = dataclasses.field(default_factory=list)  # wall seconds, per process
    warmup_extra: list[float] = dataclasses.field(default_factory=list)  # wall seconds, per process
    peak: int | None = None  # bytes: growth during train() (CUDA: peak allocated)
    steps_peak: int | None = None  # the same up to the end of the last step (no final checkpoint)
    reset: bool = True
    trainable: int = 0
    optimizer_state: int = 0
    optimizer_file: int = 0
    threads: int = 0
    error: str | None = None  # the row's run failed: why

    def add_timing(self, result: dict[str, Any], warmup: int) -> None:
        marks = result["marks"]
        for c, clock in enumerate(step_time.CLOCKS):
            intervals = [b[c] - a[c] for a, b in zip(marks, marks[1:], strict=False)]
            self.steady[clock] += intervals[warmup:]
            if clock == "wall":
                steady = statistics.median(intervals[warmup:])
                self.warmup.append(intervals[:warmup])
                self.warmup_extra.append(sum(intervals[:warmup]) - warmup * steady)
        self.trainable = result["trainable"]
        self.optimizer_state, self.optimizer_file = result["optimizer_state"], result["optimizer_file"]
        self.threads = result["threads"]
        if result["peak"] is not None:  # CUDA: measured in the timing process
            self.add_memory(result)

    def add_memory(self, result: dict[str, Any]) -> None:
        self.peak = max(self.peak or 0, result["peak"])
        self.steps_peak = max(self.steps_peak or 0, result["steps_peak"])
        self.reset = self.reset and result["reset"]

    def step(self, clock: str) -> float:
        return statistics.median(self.steady[clock])


def measure(argv: list[str], args: argparse.Namespace, names: list[str], work: Path) -> dict[str, Figures]:
    """Every row's timing processes (``--repeats`` rounds in alternating order), then, on a CPU, its
    memory process."""
    setup_file = work / "setup.json"
    figures = {name: Figures() for name in names}
    cuda = json.loads(setup_file.read_text())[ROWS[names[0]].model]["device"] == "cuda"
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            if figures[name].error:
                continue
            started = time.perf_counter()
            result = run_child(
                argv, name, "time", setup_file, work / f"run-{name}", work / f"inductor-{name}-{r}", args
            )
            progress(f"timed {name}", started, result)
            if "error" in result:
                figures[name].error = result["error"]
            else:
                figures[name].add_timing(result, args.warmup)
    for name in names if not cuda else []:
        if figures[name].error:
            continue
        started = time.perf_counter()
        result = run_child(
            argv, name, "memory", setup_file, work / f"run-{name}", work / f"inductor-{name}-0", args
        )
        progress(f"memory of {name}", started, result)
        if "error" in result:
            figures[name].error = f"memory run: {result['error']}"
        else:
            figures[name].add_memory(result)
    failed = [BASES[model] for model in BASES if BASES[model] in names and figures[BASES[model]].error]
    if failed:
        sys.exit(f"{Path(sys.argv[0]).name}: the default row {failed[0]} failed ({figures[failed[0]].error})")
    return figures


def progress(what: str, started: float, result: dict[str, Any]) -> None:
    """One line on stderr per child process, so that a run of several minutes shows where it is."""
    how = f"FAILED ({result['error']})" if "error" in result else "done"
    print(f"  {what}: {how}, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def environment(args: argparse.Namespace, setups: dict[str, step_time.Setup]) -> dict[str, Any]:
    import diffusers
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = None
    device = next(iter(setups.values())).device
    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "bitsandbytes": bnb,
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "device": device,
        "models": {model: setup.description for model, setup in setups.items()},
    }


def ratios(figures: dict[str, Figures], name: str, clock: str) -> tuple[float | None, float | None]:
    """(median step time, peak memory) of ``name`` over those of its model's default row (``None``:
    not measured)."""
    base = figures[BASES[ROWS[name].model]]
    row = figures[name]
    memory = row.peak / base.peak if row.peak is not None and base.peak else None
    step = row.step(clock) / base.step(clock) if row.steady[clock] else None
    return step, memory


def report(
    args: argparse.Namespace, env: dict[str, Any], figures: dict[str, Figures], clock: str, wall: float
) -> None:
    other = "wall" if clock == "cpu" else "cpu"
    cuda = env["device"] == "cuda"
    threads = max(f.threads for f in figures.values())
    print("difftune speed switches: steady step time, warm-up and peak memory per train setting")
    print(
        f"run      {env['date']}; Python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}, "
        f"bitsandbytes {env['bitsandbytes']}"
    )
    where = env["gpu"] if cuda else f"{env['cpu']}; {threads} torch thread{'s' if threads > 1 else ''}"
    print(f"device   {env['device']}: {where}")
    for model, description in env["models"].items():
        print(f"model    {model}: {description}")
    print(f"batch    {args.batch_size} global (Diff-Tuning defaults: target + bank), full tuning, EMA on")
    print(
        f"timing   {step_time.CLOCK_NAMES[clock]}; per row {args.repeats} fresh process(es) of "
        f"train({args.warmup} + {args.steps} + 1): median of the {args.steps} steady step intervals "
        f"after {args.warmup} warm-up ones"
    )
    print(
        f"warm-up  wall seconds of the first {args.warmup} steps beyond {args.warmup} steady steps "
        "(compile rows: the cold compilation)"
    )
    if cuda:
        print(
            "memory   peak allocated CUDA memory during train() (max_memory_allocated); steps: the same "
            "up to the end of the last step (without the final checkpoint)"
        )
    else:
        reset = all(f.reset for f in figures.values() if f.peak is not None)
        how = "high-water mark reset before train()" if reset else "NO high-water reset: upper bounds"
        print(
            f"memory   growth of the peak RSS during train({MEMORY_STEPS}) in a fresh process per row "
            f"(VmHWM - RSS before; {how});\n         steps: the same up to the end of the last step "
            "(without the final checkpoint)"
        )
    print("optim    optimiser state tensors after training / the checkpoint's optimizer.bin")
    print()
    head = (
        f"{'row':<23}{'ms/step':>9}{'IQR':>7}{other + ' ms':>9}{'warm-up s':>11}"
        f"{'peak MiB':>10}{'steps MiB':>11}{'optim MiB':>11}{'file MiB':>10}"
    )
    print(head)
    print("-" * len(head))
    for name, f in figures.items():
        if f.error and not f.steady[clock]:
            print(f"{name:<23}failed: {f.error}")
            continue
        ms = [1000 * t for t in f.steady[clock]]
        peak, steps = ("n/a" if b is None else f"{b / MIB:.1f}" for b in (f.peak, f.steps_peak))
        print(
            f"{name:<23}{statistics.median(ms):>9.1f}{step_time.iqr(ms):>7.1f}{1000 * f.step(other):>9.1f}"
            f"{statistics.median(f.warmup_extra):>11.1f}{peak:>10}{steps:>11}"
            f"{f.optimizer_state / MIB:>11.1f}{f.optimizer_file / MIB:>10.1f}"
        )
    print()
    print(f"wall time {wall:.0f} s")
    for name in figures:
        if name in BASES.values():
            continue
        step, memory = ratios(figures, name, clock)
        shown = [
            ("failed" if figures[name].error else "n/a") if r is None else f"{r:.3f}" for r in (step, memory)
        ]
        print(f"ratio {name}/{BASES[ROWS[name].model]} step {shown[0]} memory {shown[1]}")
    if EIGHT_BIT in figures and figures[EIGHT_BIT].optimizer_state:
        state = figures[EIGHT_BIT].optimizer_state / figures[THIRTY_TWO_BIT].optimizer_state
        file = figures[EIGHT_BIT].optimizer_file / figures[THIRTY_TWO_BIT].optimizer_file
        print(f"checkpoint optimizer.bin adamw_8bit/adamw {file:.3f}")
        print(f"ratio adamw_8bit/adamw optimizer_state {state:.3f}")
    else:
        why = "failed" if EIGHT_BIT in figures else "not measured"
        print(f"ratio adamw_8bit/adamw optimizer_state n/a (adamw_8bit {why})")


def as_json(
    args: argparse.Namespace, env: dict[str, Any], figures: dict[str, Figures], clock: str
) -> dict[str, Any]:
    rows = {}
    other = "wall" if clock == "cpu" else "cpu"
    for name, f in figures.items():
        step, memory = ratios(figures, name, clock)
        rows[name] = {
            "model": ROWS[name].model,
            "train": ROWS[name].train,
            "error": f.error,
            "step_seconds": f.step(clock) if f.steady[clock] else None,
            "step_seconds_other_clock": f.step(other) if f.steady[other] else None,
            "step_intervals": f.steady,
            "warmup_intervals_wall": f.warmup,
            "warmup_extra_seconds": f.warmup_extra,
            "peak_bytes": f.peak,
            "steps_peak_bytes": f.steps_peak,
            "optimizer_state_bytes": f.optimizer_state,
            "optimizer_file_bytes": f.optimizer_file,
            "trainable_parameters": f.trainable,
            "ratio_step": step,
            "ratio_memory": memory,
        }
    options = {k: v for k, v in vars(args).items() if k not in ("child", "role", "setup", "out")}
    return {"environment": env, "clock": clock, "options": options, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        return child(args)
    names = selected_rows(args)
    step_time.start(args)
    wall = time.perf_counter()
    with step_time.scratch(args, "difftune-speed-") as work:
        setups = prepare(args, work, {ROWS[name].model for name in names})
        (work / "setup.json").write_text(
            json.dumps({model: dataclasses.asdict(s) for model, s in setups.items()}, default=str)
        )
        figures = measure(argv, args, names, work)  # the children parse the same options
    env = environment(args, setups)
    clock = step_time.resolve_clock(args, env["device"])
    report(args, env, figures, clock, time.perf_counter() - wall)
    if args.json:
        args.json.write_text(json.dumps(as_json(args, env, figures, clock), indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
