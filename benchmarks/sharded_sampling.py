"""Sample-grid time of a sharded (FSDP2) run: the processes sharing the images against each making all.

Under FSDP2 every process must run the model's forward pass (each gathers its units from all), so a
training-time sample grid (``train.sample_every``), like the evaluation's FID and forgetting images,
is made on every process. difftune shares the images (``difftune.sampling.shares``: each process
generates and decodes ceil(n/N) of them, the main one gathers them); the alternative is every process
making the whole grid. Both are timed here in one run, on the same sharded model: a random-init
pixel-space DiT (``--hidden`` wide, ``--layers`` deep; the model of ``sharding_memory.py``), prepared
with the shipped ``configs/accelerate/fsdp2.yaml``'s settings on 2 gloo CPU processes (the CPU
accelerator of :mod:`difftune.testing.sharding`). The grid is 5 classes x ``--per-class`` images,
``--steps`` sampler steps. Alternating repeats; each timing starts after a barrier and is the slowest
process's wall time.

The last line::

    ratio shared/duplicated grid_time <r>      ideal 1/2 on 2 free cores

Usage::

    python benchmarks/sharded_sampling.py                       # about 2 min on 2 free cores
    python benchmarks/sharded_sampling.py --hidden 384 --layers 6 --repeats 2 --json sampling.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sharding_memory

ROOT = Path(__file__).resolve().parents[1]


def worker(result: Path, per_class: int, steps: int, repeats: int, args: list[str]) -> None:
    """One rank: prepare the sharded model, then time both ways of making the grid."""
    from accelerate.utils import gather_object

    from difftune.config.experiment import load_config
    from difftune.config.sampling import SamplingSpec
    from difftune.testing.sharding import cpu_fsdp2_accelerator
    from difftune.training.build import make_optimizer
    from difftune.training.loop import Trainer
    from difftune.training.outputs import save_sample_grid
    from difftune.training.sharding import choose_wrap_units, resharded_after

    cfg = load_config(None, args)
    tc = cfg.train
    acc = cpu_fsdp2_accelerator(tc.mixed_precision, tc.report_to, tc.output_dir)
    trainer = Trainer(cfg, accelerator=acc)
    backbone = trainer.backbone
    choose_wrap_units(acc, backbone)
    model, _ = acc.prepare(backbone, make_optimizer(trainer.parts.trainable, tc))
    spec = SamplingSpec(tc.sampling.scheduler, steps, tc.sampling.guidance_scale, seed=0)
    out = Path(tc.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def grid(shared: bool, tag: str) -> float:
        # duplicated: every process makes the whole grid (and writes its own copy)
        path = out / (f"{tag}.png" if shared else f"{tag}-rank{acc.process_index}.png")
        acc.wait_for_everyone()
        start = time.perf_counter()
        with resharded_after(backbone):
            save_sample_grid(
                acc.unwrap_model(model),
                trainer.loaded,
                trainer.target.cond,
                spec,
                path,
                acc.device,
                per_class,
                shared=acc if shared else None,
            )
        seconds = time.perf_counter() - start
        return max(gather_object([seconds]))

    grid(True, "warm-up")
    times: dict[str, list[float]] = {"shared": [], "duplicated": []}
    for r in range(repeats):
        for name in ("shared", "duplicated") if r % 2 == 0 else ("duplicated", "shared"):
            times[name].append(grid(name == "shared", f"{name}-{r}"))
    if acc.is_main_process:
        result.write_text(json.dumps(times))
    acc.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]), argv[5:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--per-class", type=int, default=8, help="images per class in the grid (5 classes)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    import torch

    from difftune.testing.processes import torchrun_command
    from difftune.testing.sharding import fsdp_launch_env

    with tempfile.TemporaryDirectory(prefix="difftune-sharded-sampling-") as tmp:
        work = Path(tmp)
        model, params = sharding_memory.build_model(work, args.hidden, args.layers)
        print(
            f"model    DiT hidden {args.hidden}, {args.layers} layers, {params / 1e6:.1f}M parameters",
            flush=True,
        )
        print(
            f"grid     5 classes x {args.per_class} images, {args.steps} sampler steps, 2 CPU processes (FSDP2), "
            f"{args.repeats} alternating repeats",
            flush=True,
        )
        env = {**os.environ, **fsdp_launch_env(), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        env["TQDM_DISABLE"] = "1"
        result = work / "times.json"
        run = sharding_memory.overrides(model, work / "run", 1, 8, "full")
        cmd = torchrun_command(
            __file__, "--worker", str(result), str(args.per_class), str(args.steps), str(args.repeats), *run
        )
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"the sharded run failed:\n{proc.stderr[-4000:]}")
        times = json.loads(result.read_text())
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(
            f"{name:<11} median {medians[name]:7.2f} s   per repeat " + " ".join(f"{v:.2f}" for v in values)
        )
    ratio = medians["shared"] / medians["duplicated"]
    if args.json:
        payload = {"params": params, "times_s": times, "ratio": ratio, "torch": torch.__version__}
        args.json.write_text(
            json.dumps({**payload, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2)
        )
    print(f"ratio shared/duplicated grid_time {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
