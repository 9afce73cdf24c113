"""Peak memory per process of sharded (FSDP2) against data-parallel (DDP) training, 2 CPU processes.

Both runs train the same random-init pixel-space DiT (``--hidden`` wide, ``--layers`` deep, 8x8 digits,
patch 2: DiT-B/2's width and depth by default, 160M parameters with diffusers' per-block embedders)
with AdamW and an EMA, full fine-tuning, the same batch and steps, started by ``torch.distributed.run``
as two gloo processes with one torch thread each. The FSDP2 run's processes take the settings of the
shipped ``configs/accelerate/fsdp2.yaml`` through the CPU accelerator of
:mod:`difftune.testing.sharding` (accelerate does not shard on a CPU by itself); the DDP run is a plain
``ACCELERATE_USE_CPU=1`` launch. Each run ends with its final checkpoint, which under FSDP gathers the
whole model and EMA into the main process to write the stock model folders.

Per run and rank: ``VmHWM`` (peak resident memory since the process started) when ``train()`` returns,
``VmRSS`` before the trainer is built (``base``: imports, data, the loaded model), and the mean seconds
per step of ``train()`` (the final checkpoint included). Also the dry run's per-process estimate of
each launch (device memory: the model's state and activations, without the interpreter and
libraries, so below the resident peaks). The last lines:

    ratio fsdp/ddp peak_rss_rank1 <r>      the process that only trains (ideal: about 1/2 of the state)
    ratio fsdp/ddp peak_rss_rank0 <r>      the main process, which also gathers the checkpoint
    ratio fsdp/ddp step_time <r>
    ratio fsdp/ddp checkpoint_state <r>    bytes of the final checkpoint's resume state (state/)

Usage::

    python benchmarks/sharding_memory.py                     # about 3 min on 2 free cores
    python benchmarks/sharding_memory.py --layers 4 --steps 2 --json sharding.json
    python benchmarks/sharding_memory.py --tuning lora       # an adapter run: the checkpoints hold the adapters
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmHWM``, ``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def overrides(model: Path, out: Path, steps: int, batch: int, tuning: str) -> list[str]:
    """The run: ``tuning`` (full fine-tuning or LoRA), AdamW, EMA, digits 8x8, no bank, a checkpoint at
    the end only."""
    return [
        f"tuning.method={tuning}",
        f"model.pretrained={model}",
        "data.source=digits",
        "data.classes=[0,1,2,3,4]",
        "data.per_class=20",
        "objective.bank_share=0",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        "train.checkpoint_every=0",
        f"train.log_every={steps}",
    ]


def worker(mode: str, result: Path, args: list[str]) -> None:
    """One rank: train, then write its peaks and step time to ``result``-<rank>.json."""
    from difftune.config.experiment import load_config
    from difftune.testing.sharding import cpu_fsdp2_accelerator
    from difftune.training.loop import Trainer

    cfg = load_config(None, args)
    tc = cfg.train
    base = _status("VmRSS")
    accelerator = (
        cpu_fsdp2_accelerator(tc.mixed_precision, tc.report_to, tc.output_dir) if mode == "fsdp" else None
    )
    trainer = Trainer(cfg, accelerator=accelerator)
    start = time.perf_counter()
    trainer.train()
    seconds = (time.perf_counter() - start) / tc.max_steps
    rank = trainer.accelerator.process_index
    record = {"rank": rank, "peak": _status("VmHWM"), "base": base, "seconds_per_step": seconds}
    Path(f"{result}-{rank}.json").write_text(json.dumps(record))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def launch(mode: str, model: Path, work: Path, steps: int, batch: int, tuning: str) -> dict[str, Any]:
    """Train as 2 processes in ``mode`` (``ddp`` or ``fsdp``): each rank's record, and the bytes of the
    final checkpoint's resume state (``state/``: model or adapters, optimizer, EMA, loop)."""
    from difftune.testing.sharding import fsdp_launch_env

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    if mode == "fsdp":
        env.update(fsdp_launch_env())
    result = work / f"{mode}-result"
    from difftune.testing.processes import torchrun_command

    cmd = torchrun_command(
        __file__, "--worker", mode, str(result), *overrides(model, work / f"{mode}-run", steps, batch, tuning)
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{mode} run failed:\n{proc.stderr[-4000:]}")
    (checkpoint,) = (work / f"{mode}-run" / "checkpoints").iterdir()
    return {
        "ranks": [json.loads(Path(f"{result}-{rank}.json").read_text()) for rank in (0, 1)],
        "state_bytes": folder_bytes(checkpoint / "state"),
    }


def build_model(root: Path, hidden: int, layers: int) -> tuple[Path, int]:
    """A random-init pixel-space DiT saved as a pipeline folder; its parameter count."""
    from diffusers import DiTTransformer2DModel

    from difftune.testing.models import save_pipeline_dir

    heads = max(1, hidden // 64)
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=1,
        out_channels=2,
        num_layers=layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=5,
        norm_num_groups=1,
    )
    return save_pipeline_dir(root / "dit", model, "transformer"), sum(p.numel() for p in model.parameters())


def estimates(model: Path, work: Path, steps: int, batch: int, tuning: str) -> dict[str, float]:
    """The dry run's per-process estimate (GiB) of the DDP and the FSDP launch on 2 processes."""
    from difftune.backbones.loading import peek_backbone
    from difftune.config.experiment import load_config
    from difftune.training.memory_estimate import estimate_training_memory

    cfg = load_config(None, overrides(model, work / "unused", steps, batch, tuning))
    found = {}
    for mode in ("ddp", "fsdp"):
        memory = estimate_training_memory(cfg, peek_backbone(str(model)), model, 2, sharded=mode == "fsdp")
        found[mode] = memory.total / GIB
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1], Path(argv[2]), argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--tuning", choices=("full", "lora"), default="full", help="tuning.method of both runs"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory(prefix="difftune-sharding-") as tmp:
        work = Path(tmp)
        model, params = build_model(work, args.hidden, args.layers)
        print(
            f"model    DiT hidden {args.hidden}, {args.layers} layers, {params / 1e6:.1f}M parameters",
            flush=True,
        )
        print(
            f"run      2 CPU processes, {args.tuning} tuning, batch {args.batch_size}, {args.steps} steps, "
            "AdamW + EMA, fp32",
            flush=True,
        )
        launched = {
            mode: launch(mode, model, work, args.steps, args.batch_size, args.tuning)
            for mode in ("ddp", "fsdp")
        }
        estimate = estimates(model, work, args.steps, args.batch_size, args.tuning)
    runs = {mode: found["ranks"] for mode, found in launched.items()}
    state = {mode: found["state_bytes"] for mode, found in launched.items()}
    print(f"{'mode':<6} {'rank':>4} {'base GiB':>9} {'peak GiB':>9} {'s/step':>7} {'estimate GiB':>13}")
    for mode, ranks in runs.items():
        for r in ranks:
            print(
                f"{mode:<6} {r['rank']:>4} {r['base'] / GIB:>9.2f} {r['peak'] / GIB:>9.2f} "
                f"{r['seconds_per_step']:>7.2f} {estimate[mode]:>13.2f}"
            )
    for mode, size in state.items():
        print(f"state    {mode}: the final checkpoint's state/ holds {size / 2**20:.1f} MiB")
    print(f"weights  {4 * params / 2**20:.1f} MiB of fp32 weights in the whole model")
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    ratios = {
        "peak_rss_rank1": fsdp[1]["peak"] / ddp[1]["peak"],
        "peak_rss_rank0": fsdp[0]["peak"] / ddp[0]["peak"],
        "step_time": fsdp[0]["seconds_per_step"] / ddp[0]["seconds_per_step"],
        "checkpoint_state": state["fsdp"] / state["ddp"],
    }
    if args.json:
        versions = {"torch": torch.__version__}
        payload = {
            "params": params,
            "runs": runs,
            "state_bytes": state,
            "estimate_gib": estimate,
            "ratios": ratios,
            "versions": versions,
        }
        args.json.write_text(
            json.dumps({**payload, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2)
        )
    for name, value in ratios.items():
        print(f"ratio fsdp/ddp {name} {value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
