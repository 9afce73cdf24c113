"""Resume needs no more memory than training, and an adapter run's checkpoint holds only the adapter.

Four measured runs of the real ``Trainer`` on one random-init DiT (``step_time.py``'s sources, bank and
target), each in a fresh process:

* ``train``: 2 steps of full fine-tuning with an EMA, ending in a checkpoint;
* ``resume``: the same run resumed from that checkpoint for 2 more steps (difftune's restore: the
  checkpoint's tensors and the EMA's averages copied into the live ones, one at a time);
* ``resume (stock)``: the same resume with accelerate's and diffusers' own loading (the whole model file
  read beside the model; ``EMAModel.load_state_dict``, which deep-copies the averages): the way it was;
* ``lora``: 2 steps of a LoRA run, for its checkpoint's size.

For each, the growth of the process's peak resident set during ``train()`` over its resident set just
before (``peft_bench.py``'s probe: ``VmHWM`` after ``clear_refs``). ``train()`` of a resumed run
includes the restore and the same number of steps, so resume / train is the restore's extra cost.

    python benchmarks/resume_memory.py                    # DiT-S/2 (35M parameters), batch 5: about 1 min
    python benchmarks/resume_memory.py --batch-size 32    # activations dominate: the restore hides under them

The default batch is small so that, as for a real-size model on one device, the weights, the
optimiser's moments and the EMA set the peak rather than the activations; with a batch whose
activations dwarf the weights, the restore's transient hides under the training step's peak.

The last lines print ``ratio resume/train <r>`` (target <= 1.05), the stock path's ratio beside it, and
``ratio lora/full checkpoint <c>`` (the model state of the checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peft_bench  # noqa: E402
import step_time  # noqa: E402

MIB = 2**20
STEPS = 2


def _stock_restore() -> None:
    """Make this process restore a checkpoint the stock way (accelerate's load, diffusers' EMA load)."""
    import contextlib

    from safetensors.torch import load_file

    import difftune.training.loop as loop
    import difftune.training.state as state

    loop.compact_model_state = lambda accelerator, model: contextlib.nullcontext()

    def load_ema(ema, path):  # noqa: ANN001, ANN202
        tensors = load_file(str(path))
        ema.load_state_dict({"shadow_params": [tensors[k] for k in sorted(tensors)]})

    state.load_ema_in_place = load_ema


def child(args: argparse.Namespace) -> int:
    """One measured run, in this process; prints its JSON."""
    from difftune.training.loop import Trainer

    step_time.start(args)
    fields = json.loads(args.setup)
    setup = step_time.Setup(
        **{k: Path(v) if k in ("source", "bank", "cache") else v for k, v in fields.items()}
    )
    mode, out = args.child, Path(args.out)
    if mode == "resume-stock":
        _stock_restore()
    run = step_time.Run(tuning={"method": "lora"}) if mode == "lora" else step_time.Run()
    steps = 2 * STEPS if mode.startswith("resume") else STEPS
    cfg = step_time.make_config(setup, run, args, out, steps)
    cfg.train.ema_decay = 0.999
    if mode.startswith("resume"):
        cfg.train.resume = "latest"
    trainer = Trainer(cfg)
    seen = peft_bench.Observed()
    with peft_bench.rss_probe(trainer, seen):
        trainer.train()
    state = sorted((out / "checkpoints").iterdir())[-1] / "state" / "model.safetensors"
    print(json.dumps({"peak": seen.peak[-1], "reset": seen.reset, "state_bytes": state.stat().st_size}))
    return 0


def measure(args: argparse.Namespace, setup: step_time.Setup, mode: str, out: Path) -> dict:
    env = {**os.environ, **peft_bench.CHILD_MALLOC}
    fields = {
        "source": str(setup.source),
        "bank": str(setup.bank),
        "cache": str(setup.cache),
        "description": setup.description,
        "device": setup.device,
    }
    argv = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--out",
        str(out),
        "--setup",
        json.dumps(fields),
        "--size",
        args.size,
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--batch-size",
        str(args.batch_size),
        "--bank-samples",
        str(args.bank_samples),
        "--bank-steps",
        str(args.bank_steps),
    ]
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"the {mode} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_time.add_arguments(p, size="dit-s")
    p.set_defaults(batch_size=5)  # weights, not activations, set the peak: the case of a real-size model
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    args = step_time.check_args(p, p.parse_args(argv))
    if args.child:
        return child(args)
    step_time.start(args)
    with tempfile.TemporaryDirectory(prefix="difftune-resume-") as tmp:
        work = Path(tmp)
        setup = step_time.prepare(args, work)
        print(
            f"model: {setup.description}; batch {args.batch_size}; {STEPS} steps each; device {setup.device}"
        )
        rows = {"train": measure(args, setup, "train", work / "full")}
        for mode in ("resume", "resume-stock"):  # each from the same 2-step checkpoint
            copy = work / mode
            subprocess.run(["cp", "-r", str(work / "full"), str(copy)], check=True)
            rows[mode] = measure(args, setup, mode, copy)
        rows["lora"] = measure(args, setup, "lora", work / "lora")
    print(f"{'run':<14} {'peak RSS growth':>16} {'model state in checkpoint':>26}")
    for name, row in rows.items():
        print(f"{name:<14} {row['peak'] / MIB:>12.1f} MiB {row['state_bytes'] / MIB:>22.2f} MiB")
    if not all(row["reset"] for row in rows.values()):
        print("note: the kernel refused to reset the peak (clear_refs); the growths are upper bounds")
    train = rows["train"]["peak"]
    print(
        f"ratio resume/train {rows['resume']['peak'] / train:.3f} (stock loading: "
        f"{rows['resume-stock']['peak'] / train:.3f}); target <= 1.05"
    )
    print(f"ratio lora/full checkpoint {rows['lora']['state_bytes'] / rows['train']['state_bytes']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
