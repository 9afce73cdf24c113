"""Peak memory of a training run against the size of its data (target latents and bank read from disk).

A run reads the target set's cached latents (``samples``, ``std``) and the knowledge bank's ``samples``
from its safetensors shards on disk (:class:`~difftune.io.mapped.MappedRows`), a batch at a time,
and a background thread reads the next step's rows while a step trains
(:class:`~difftune.training.prefetch.RowPrefetcher`). This script measures three things with the real
``Trainer`` on one random-init latent-space DiT (``step_time.py``'s ``build_source``: hidden 128,
4 layers, 4x16x16 latents of a tiny random VAE), each run in fresh processes:

1. the peak resident memory of a 2-process run (CPU, gloo, started by ``torch.distributed.run`` as
   ``tests/ddp_worker.py`` is) on a synthetic set of ``--samples-large`` samples against one of
   ``--samples-small``: same model, batch (Diff-Tuning: 26 target + 6 bank) and steps; once with the
   sets on disk (what a run does) and once loaded into memory (``LatentStore.load()``), to show
   what the mapping saves. Per run: the largest peak of the two processes, and their sum;
2. Diff-Tuning's peak against plain fine-tuning's (``bank_share 0.2`` with the bank against
   ``bank_share 0`` and no bank; ``step_time.py``'s two configs), one process, on the large set;
3. the prefetch's effect, one process, on the large set, with the prefetch and without it
   (``RowPrefetcher.ask`` made a no-op in that process): the time a step waits for its rows (the
   ``RowPrefetcher.read`` calls of ``RunParts.batch``: a prefetched read's result, or the read done on
   the spot), and the time of the whole ``RunParts.batch`` (also a fresh draw from each posterior,
   the objective's draw, the next step's reads started), each averaged over the steps after the first
   (whose rows nothing reads ahead).

Each row of the table also gives the mean seconds per step of ``train()`` (the final checkpoint
included): the steps are short, so a busy machine moves the timings far more than the memory.

What is injected, and why: encoding 100,000 images with a VAE would take hours on a CPU, so the sets
are written directly as safetensors shards with :class:`~difftune.io.store.LatentStore` (a target
cache of ``samples``, ``std``, ``labels``; a bank of ``samples``, ``labels``, ``seeds``; random
values, shards of 4096 rows), and in each training process, before the ``Trainer`` is built,
``difftune.training.build.prepare_target`` and ``difftune.training.build.training_bank`` (names
imported into ``build.py``) are replaced by functions that open those stores with
``LatentStore(...).load(mapped=...)`` and return the ``TargetData`` / ``RunBank`` the real functions
return in a run (mapped ``samples``/``std`` of the target, mapped ``samples`` of the bank, conditions
and seeds in memory), minus the encoding and the checks against the model's fingerprint. Everything
after that (index streams, batches, prefetch, DDP, optimiser, EMA, checkpoint, final model) is the
real run.

Peak memory is each training process's ``VmHWM`` (``/proc/self/status``) read when ``train()`` returns:
the absolute peak of the process since it started (imports, model, data, training, the final
checkpoint), so the ratios compare whole processes. ``base`` is ``VmRSS`` just before the ``Trainer``
is built; ``RssAnon`` and ``RssFile`` are read when ``train()`` returns. ``MappedRows`` reads each
batch's rows with positioned reads, so what a run has read stays in the page cache, not in its
resident set; it once kept every shard memory-mapped, and then every page a process had read counted
in its ``RssFile`` for the rest of the run (its peak grew with the steps toward the whole set). The
script also reads one epoch of the large set's batches (the run's index streams and batch, no model) from each set in a
fresh process and prints its ``RssFile`` and ``RssAnon`` afterwards. Before every run the shards are
written back and dropped from the page cache (``posix_fadvise(DONTNEED)``), so every run reads its
rows cold.

    python benchmarks/data_memory.py                       # 100k vs 1k samples, 100 steps: about 5 min on 2 cores
    python benchmarks/data_memory.py --steps 20            # about 2.5 min
    python benchmarks/data_memory.py --samples-large 20000 --steps 10 --json data_memory.json

It writes the sets under a temporary folder in /tmp (about 1.2 GB for 100k samples: target 800 MB,
bank 400 MB) and removes it at the end (``--keep`` keeps it). The last lines print
``ratio 100k/1k peak_rss <r>`` (mapped; target <= 1.2), ``ratio 100k/1k peak_rss in-memory <r>`` and
``ratio diff-tuning/plain peak_rss <r>`` (target <= 1.02). The mapped ratio depends on ``--steps``
(see above): 1.115 at 20 steps, 1.500 at 100 (the default), 1.838 at 200 (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402

MIB = 2**20
SHARD = 4096  # rows per shard, as a target cache's default
SIZE = "latent-small"
# hidden 128, 4 layers, 64 tokens on 4x16x16 latents of a tiny random VAE (128 px images): the latent
# path at a size that trains quickly on a CPU
step_time.SIZES.setdefault(
    SIZE, {"heads": 4, "head_dim": 32, "layers": 4, "sample": 16, "channels": 4, "latent": True}
)
LATENT = (4, 16, 16)
CLASSES = len(step_time.TARGET_CLASSES)


# ---------------------------------------------------------------------------------------------- sets


def write_sets(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """A target cache and a bank of ``n`` random latents each, in shards of :data:`SHARD` rows."""
    import torch

    from difftune.io.store import LatentStore

    shards = -(-n // SHARD)
    common = {"format": 1, "num_samples": n, "shard_size": SHARD, "num_shards": shards}
    target = LatentStore.create(
        root / f"target-{n}",
        {**common, "kind": "target", "data": f"synthetic:{n}", "codec": "synthetic", "hflip": False},
    )
    bank = LatentStore.create(
        root / f"bank-{n}",
        {
            **common,
            "kind": "bank",
            "source": "synthetic",
            "source_fingerprint": "synthetic",
            "vae": None,
            "space": "latent",
            "shape": list(LATENT),
            "dtype": "float32",
            "scheduler": "DDIMScheduler",
            "noise_schedule": {},
            "num_inference_steps": 4,
            "guidance_scale": 1.0,
            "seed": seed,
            "num_classes": CLASSES,
        },
    )
    for i in range(shards):
        rows = min(SHARD, n - i * SHARD)
        g = torch.Generator().manual_seed(seed * 100003 + i)
        labels = torch.randint(0, CLASSES, (rows,), generator=g)
        target.write_shard(
            i,
            {
                "samples": torch.randn(rows, *LATENT, generator=g),
                "std": 0.05 + 0.1 * torch.rand(rows, *LATENT, generator=g),
                "labels": labels,
            },
        )
        bank.write_shard(
            i,
            {
                "samples": torch.randn(rows, *LATENT, generator=g),
                "labels": torch.randint(0, CLASSES, (rows,), generator=g),
                "seeds": torch.arange(i * SHARD, i * SHARD + rows),
            },
        )
    return target.root, bank.root


def evict(roots: list[Path]) -> None:
    """Write the stores' shards back and drop them from the page cache, so that a run reads them cold."""
    for root in roots:
        for path in sorted(root.glob("shard-*.safetensors")):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ------------------------------------------------------------------------------------ one training run


def status() -> dict[str, int]:
    """This process's memory lines of /proc/self/status, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def inject(spec: dict) -> None:
    """Make this process's run read the synthetic stores of ``spec`` (see the module docstring)."""
    import torch

    import difftune.training.build as build
    from difftune.backbones.conditioning import Conditioning
    from difftune.bank.conditions import RunBank
    from difftune.config.sampling import SamplingSpec
    from difftune.data.targets import TargetData
    from difftune.io.store import LatentStore

    in_files = spec["layout"] == "mapped"
    real_bank = build.training_bank

    def prepare_target(cfg, loaded, cache_dir, device="cpu", mapped=False):  # noqa: ANN001, ANN202, ARG001
        cached = LatentStore(spec["target"]).load(mapped=("samples", "std") if in_files else ())
        cond = Conditioning({k: v for k, v in cached.items() if k not in ("samples", "std")})
        loaded.backbone.check_condition(cond)
        return TargetData(cached["samples"], cached["std"], cond, [f"class{i}" for i in range(CLASSES)])

    def training_bank(cfg, loaded):  # noqa: ANN001, ANN202
        if not cfg.reads_bank:  # the real function's empty bank: nothing is read
            return real_bank(cfg, loaded)
        store = LatentStore(spec["bank"])
        bank, manifest = store.load(mapped=("samples",) if in_files else ()), store.manifest
        sampling = SamplingSpec(
            scheduler=manifest["scheduler"],
            steps=manifest["num_inference_steps"],
            guidance_scale=manifest["guidance_scale"],
            seed=manifest["seed"],
        )
        names = [name for name in loaded.backbone.condition_names if name in bank]
        n = int(bank["samples"].shape[0])
        cond = Conditioning({name: bank[name] for name in names}, n)
        return RunBank(bank["samples"], cond, bank["seeds"].to(torch.long), sampling)

    build.prepare_target = prepare_target
    build.training_bank = training_bank


def child(spec: dict) -> int:
    """One training process: inject the sets, train, write this rank's record as JSON."""
    args = argparse.Namespace(verbose=False, device="cpu", threads=1)
    step_time.start(args)
    import contextlib
    import io

    from difftune.training.build import RunParts
    from difftune.training.loop import Trainer
    from difftune.training.prefetch import RowPrefetcher

    inject(spec)
    if not spec["prefetch"]:
        RowPrefetcher.ask = lambda self, name, values, indices: None  # every read done on the spot
    times: list[float] = []  # of each RunParts.batch call
    read_times: list[float] = []  # of the RowPrefetcher.read calls of each batch: its rows' wait
    batch, read, reading = RunParts.batch, RowPrefetcher.read, [0.0]

    def timed_batch(self, step, objective):  # noqa: ANN001, ANN202
        reading[0], start = 0.0, time.perf_counter()
        out = batch(self, step, objective)
        times.append(time.perf_counter() - start)
        read_times.append(reading[0])
        return out

    def timed_read(self, name, values, indices):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        out = read(self, name, values, indices)
        reading[0] += time.perf_counter() - start
        return out

    RunParts.batch, RowPrefetcher.read = timed_batch, timed_read
    setup = step_time.Setup(Path(spec["source"]), Path(spec["bank"]), Path(spec["target"]), "", "cpu")
    run_args = argparse.Namespace(
        batch_size=spec["batch"], seed=0, bank_samples=spec["samples"], bank_steps=4
    )
    run = step_time.Run(objective=step_time.METHODS[spec["method"]])
    cfg = step_time.make_config(setup, run, run_args, Path(spec["out"]), spec["steps"])
    if not cfg.uses_bank:
        cfg.bank.path = ""  # plain fine-tuning: no bank at all
    base = status()["VmRSS"]
    with contextlib.redirect_stderr(io.StringIO()):  # the trainer's progress bars
        trainer = Trainer(cfg)
        wall = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - wall
    end = status()
    acc = trainer.accelerator
    record = {
        "rank": acc.process_index,
        "processes": acc.num_processes,
        "base": base,
        "peak": end["VmHWM"],
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "end": end,
        "batch_seconds": times,
        "read_seconds": read_times,
        "train_seconds": wall,
        "target_type": type(trainer.target.samples).__name__,
        "bank_type": type(trainer.bank).__name__,
        "bank_rows": int(trainer.bank.shape[0]),
    }
    result = Path(spec["results"])
    result.mkdir(parents=True, exist_ok=True)
    (result / f"rank-{acc.process_index}.json").write_text(json.dumps(record))
    return 0


def reads(spec: dict) -> int:
    """Read the rows of ``batches`` steps as a run does (no training, no prefetch); print the memory."""
    step_time.start(argparse.Namespace(verbose=False, device="cpu", threads=1))
    from difftune.io.store import LatentStore
    from difftune.training.streams import IndexStream

    in_files = spec["layout"] == "mapped"
    target = LatentStore(spec["target"]).load(mapped=("samples", "std") if in_files else ())
    bank = LatentStore(spec["bank"]).load(mapped=("samples",) if in_files else ())
    n_bank = int(0.2 * spec["batch"])
    streams = IndexStream(spec["samples"], 0), IndexStream(spec["samples"], 1)
    before = status()
    started = time.perf_counter()
    for _ in range(spec["batches"]):
        rows = streams[0].take(spec["batch"] - n_bank)
        target["samples"][rows], target["std"][rows], bank["samples"][streams[1].take(n_bank)]
    seconds = time.perf_counter() - started
    print(json.dumps({"before": before, "after": status(), "seconds": seconds}))
    return 0


def measure_reads(spec: dict, timeout: int) -> dict:
    """:func:`reads` in a fresh process, the stores dropped from the page cache first."""
    evict([Path(spec["target"]), Path(spec["bank"])])
    argv = [sys.executable, str(Path(__file__).resolve()), "--reads", json.dumps(spec)]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if done.returncode:
        sys.exit(f"the reads of {spec['samples']} samples failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return {
        **json.loads(done.stdout.strip().splitlines()[-1]),
        "samples": spec["samples"],
        "batches": spec["batches"],
    }


def measure(work: Path, name: str, spec: dict, processes: int, timeout: int) -> dict:
    """Run ``spec`` in ``processes`` fresh training processes; their records and a summary."""
    spec = {**spec, "out": str(work / "runs" / name), "results": str(work / "results" / name)}
    evict([Path(spec["target"]), Path(spec["bank"])])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "ACCELERATE_USE_CPU": "1",
        "TQDM_DISABLE": "1",
    }
    me = [str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    if processes > 1:
        from difftune.testing.processes import torchrun_command

        argv = torchrun_command(*me, processes=processes)
    else:
        argv = [sys.executable, *me]
    started = time.perf_counter()
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )
    if done.returncode:
        sys.exit(f"the {name} run failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    ranks = [json.loads((Path(spec["results"]) / f"rank-{i}.json").read_text()) for i in range(processes)]
    if sorted(r["rank"] for r in ranks) != list(range(processes)) or any(
        r["processes"] != processes for r in ranks
    ):
        sys.exit(f"the {name} run did not run on {processes} processes: {ranks}")
    # rank 0's steps after the first (whose rows are never prefetched)
    batches = [1000 * t for t in ranks[0]["batch_seconds"][1:]]
    reads = [1000 * t for t in ranks[0]["read_seconds"][1:]]
    return {
        "name": name,
        "processes": processes,
        "samples": spec["samples"],
        "layout": spec["layout"],
        "method": spec["method"],
        "prefetch": spec["prefetch"],
        "peak_max": max(r["peak"] for r in ranks),
        "peak_sum": sum(r["peak"] for r in ranks),
        "base_max": max(r["base"] for r in ranks),
        "rss_file_end_max": max(r["end"].get("RssFile", 0) for r in ranks),
        "rss_anon_end_max": max(r["end"].get("RssAnon", 0) for r in ranks),
        "batch_ms_mean": statistics.fmean(batches),
        "batch_ms_median": statistics.median(batches),
        "read_ms_mean": statistics.fmean(reads),
        "read_ms_median": statistics.median(reads),
        "step_seconds": ranks[0]["train_seconds"] / spec["steps"],
        "wall_seconds": time.perf_counter() - started,
        "ranks": ranks,
    }


# ------------------------------------------------------------------------------------------------ main


def short(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--samples-large", type=int, default=100_000, help="samples of the large set (target and bank)"
    )
    p.add_argument(
        "--samples-small", type=int, default=1_000, help="samples of the small set (target and bank)"
    )
    p.add_argument("--steps", type=int, default=100, help="optimiser steps of every run")
    p.add_argument(
        "--batch-size", type=int, default=32, help="global batch (Diff-Tuning: 80%% target, 20%% bank)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=900, help="seconds one run may take before it is ended")
    p.add_argument("--json", type=Path, help="also write every figure (and each process's record) here")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--reads", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.reads:
        return reads(json.loads(args.reads))
    if (
        args.steps < 2
        or args.samples_small < 1
        or args.samples_large < args.samples_small
        or args.batch_size < 2
    ):
        p.error("need --steps >= 2, --batch-size >= 2 and 1 <= --samples-small <= --samples-large")
    step_time.start(argparse.Namespace(verbose=False, device="cpu", threads=1))
    wall = time.perf_counter()
    with step_time.scratch(args, "difftune-data-memory-") as work:
        source, description = step_time.build_source(work / "source", SIZE, args.seed)
        sets = {n: write_sets(work, n, args.seed) for n in (args.samples_small, args.samples_large)}
        print(
            f"model: {description}; global batch {args.batch_size}; {args.steps} steps per run; CPU, 1 thread"
        )
        print(
            f"sets written in {time.perf_counter() - wall:.0f} s (target and bank of each size, {SHARD}-row shards)"
        )

        def spec(n: int, layout: str = "mapped", method: str = "diff-tuning", prefetch: bool = True) -> dict:
            target, bank = sets[n]
            return {
                "source": str(source),
                "target": str(target),
                "bank": str(bank),
                "samples": n,
                "layout": layout,
                "method": method,
                "prefetch": prefetch,
                "steps": args.steps,
                "batch": args.batch_size,
            }

        large, small = args.samples_large, args.samples_small
        plan = [
            (f"2 procs, {short(small)}, mapped", spec(small), 2),
            (f"2 procs, {short(large)}, mapped", spec(large), 2),
            (f"2 procs, {short(small)}, in memory", spec(small, "memory"), 2),
            (f"2 procs, {short(large)}, in memory", spec(large, "memory"), 2),
            (f"1 proc, {short(large)}, diff-tuning", spec(large), 1),
            (f"1 proc, {short(large)}, plain", spec(large, method="plain"), 1),
            (f"1 proc, {short(large)}, no prefetch", spec(large, prefetch=False), 1),
        ]
        rows = []
        for name, run_spec, processes in plan:
            rows.append(
                measure(work, name.replace(", ", "-").replace(" ", "_"), run_spec, processes, args.timeout)
            )
            print(f"  {name}: done in {rows[-1]['wall_seconds']:.0f} s", flush=True)
        # one epoch of the large set's batches, read from each set as a run reads them: what a long
        # run's reads add to a process's resident set
        epoch = -(-large // (args.batch_size - int(0.2 * args.batch_size)))
        epoch_reads = [measure_reads({**spec(n), "batches": epoch}, args.timeout) for n in (small, large)]
        print(f"  reads of {epoch} batches from each set: done", flush=True)

    print()
    head = f"{'run':<30}{'base MiB':>10}{'peak MiB (max)':>16}{'peak MiB (sum)':>16}{'RssAnon end':>13}{'RssFile end':>13}{'read ms':>9}{'batch ms':>10}{'s/step':>8}"
    print(head)
    for (name, _, _), row in zip(plan, rows, strict=True):
        print(
            f"{name:<30}{row['base_max'] / MIB:>10.1f}{row['peak_max'] / MIB:>16.1f}{row['peak_sum'] / MIB:>16.1f}"
            f"{row['rss_anon_end_max'] / MIB:>13.1f}{row['rss_file_end_max'] / MIB:>13.1f}"
            f"{row['read_ms_mean']:>9.2f}{row['batch_ms_mean']:>10.2f}{row['step_seconds']:>8.3f}"
        )
    mapped_s, mapped_l, memory_s, memory_l, diff, plain, unprefetched = rows
    sum_ratio = mapped_l["peak_sum"] / mapped_s["peak_sum"]
    sum_ratio_memory = memory_l["peak_sum"] / memory_s["peak_sum"]
    print()
    print(
        f"sum over the 2 processes: {short(large)}/{short(small)} {sum_ratio:.3f} mapped, "
        f"{sum_ratio_memory:.3f} in memory; mapping saves "
        f"{(memory_l['peak_sum'] - mapped_l['peak_sum']) / MIB:.0f} MiB at {short(large)}"
    )
    print()
    print(f"one epoch of {short(large)} ({epoch} batches) of reads, no training, 1 process, mapped:")
    print(
        f"{'set':<8}{'RSS before MiB':>16}{'RSS after MiB':>15}{'RssFile after MiB':>19}{'RssAnon after MiB':>19}{'s':>7}"
    )
    for r in epoch_reads:
        after = r["after"]
        print(
            f"{short(r['samples']):<8}{r['before']['VmRSS'] / MIB:>16.1f}{after['VmRSS'] / MIB:>15.1f}"
            f"{after['RssFile'] / MIB:>19.1f}{after['RssAnon'] / MIB:>19.1f}{r['seconds']:>7.1f}"
        )
    grown = [r["after"]["RssFile"] - r["before"]["RssFile"] for r in epoch_reads]
    print(
        f"one epoch of reads grows the process's file-backed memory by {grown[1] / MIB:.0f} MiB on the "
        f"{short(large)} set (RssFile; {grown[0] / MIB:.0f} MiB on the {short(small)} set): what a run reads "
        "stays in the page cache, not in the process"
    )
    speedup = unprefetched["read_ms_mean"] / diff["read_ms_mean"]
    print(
        f"prefetch: a step waits {diff['read_ms_mean']:.2f} ms for its rows (median {diff['read_ms_median']:.2f}) "
        f"with it, {unprefetched['read_ms_mean']:.2f} ms (median {unprefetched['read_ms_median']:.2f}) without: "
        f"x{speedup:.1f}; whole batch {diff['batch_ms_mean']:.2f} vs {unprefetched['batch_ms_mean']:.2f} ms; "
        f"mean of steps 2..{args.steps}, cold page cache"
    )
    print(f"wall time {time.perf_counter() - wall:.0f} s")
    ratios = {
        "mapped": mapped_l["peak_max"] / mapped_s["peak_max"],
        "in_memory": memory_l["peak_max"] / memory_s["peak_max"],
        "diff_tuning_over_plain": diff["peak_max"] / plain["peak_max"],
    }
    if args.json:
        report = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "model": description,
            "versions": versions(),
            "runs": rows,
            "ratios": {**ratios, "mapped_sum": sum_ratio, "in_memory_sum": sum_ratio_memory},
            "prefetch_speedup": speedup,
            "epoch_reads": epoch_reads,
        }
        args.json.write_text(json.dumps(report, indent=1))
    label = f"{short(large)}/{short(small)}"
    print(f"ratio {label} peak_rss {ratios['mapped']:.3f}")
    print(f"ratio {label} peak_rss in-memory {ratios['in_memory']:.3f}")
    print(f"ratio diff-tuning/plain peak_rss {ratios['diff_tuning_over_plain']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
