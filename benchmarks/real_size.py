"""A real-size model end to end on this machine: the paper's DiT-XL/2 recipe at 256 px, random weights.

DiT-XL/2 (diffusers' ``DiTTransformer2DModel`` with the published ``facebook/DiT-XL-2-256`` configuration)
and the SD-VAE (``AutoencoderKL``, the published ``stabilityai/sd-vae-ft-ema`` configuration) are built
with random weights and saved as a pipeline folder (nothing is downloaded). The shipped recipe
``configs/paper/dit_xl2_food101.yaml`` then runs with only the model, the data (two classes of random
256-px images), the output and the step counts overridden, each phase a ``difftune`` command in its
own process:

1. ``bank``: 2 samples, 2 sampling steps;
2. ``train``: 2 steps at batch 2 (1 target + 1 bank), a checkpoint at the end;
3. ``train`` resumed to step 3 (``train.resume=latest``);
4. ``sample``: 1 image, 2 steps, from ``final/``;
5. the stock ``DiTPipeline.from_pretrained(final)``: 1 image, 2 steps.

It prints the dry run's memory estimate (``difftune train --dry-run``), the parameters (the
transformer's, and the original DiT-XL/2's 675M for comparison), and for each phase its wall time (start-up, loading and encoding included: the resumed run's is one step plus
the restore) and its peak resident memory (``ru_maxrss`` of that process alone). The last line is
the same as JSON. ``ratio estimated/measured train peak`` compares the estimate with the training
phase's peak.

    python benchmarks/real_size.py                     # DiT-XL/2: about 20 GB of memory, 15-25 min on 2 cores
    python benchmarks/real_size.py --size dit-s        # DiT-S/2 (the same pipeline; a quick check)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "paper" / "dit_xl2_food101.yaml"
# the published configurations (facebook/DiT-XL-2-256's transformer; DiT-S/2 for a quick check)
DIT = {
    "dit-xl2": {"num_attention_heads": 16, "attention_head_dim": 72, "num_layers": 28},
    "dit-s": {"num_attention_heads": 6, "attention_head_dim": 64, "num_layers": 12},
}
ORIGINAL_PARAMETERS = {"dit-xl2": 675_129_632, "dit-s": 32_955_296}  # the DiT paper's models (one embedder)
# the SD-VAE's published configuration (stabilityai/sd-vae-ft-ema), less its sample_size
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
}
GIB = 2**30


def build_pipeline(root: Path, size: str) -> int:
    """Save the random-init transformer, SD-VAE and DDPM schedule under ``root``; return the parameters."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        **DIT[size],
        in_channels=4,
        out_channels=8,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )
    transformer.save_pretrained(root / "transformer")
    AutoencoderKL(**SD_VAE, sample_size=256).save_pretrained(root / "vae")
    DDPMScheduler(beta_schedule="linear", num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return sum(p.numel() for p in transformer.parameters())


def random_images(root: Path) -> None:
    """Two classes of three random 256-px images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png"
            )


WRAP = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("PEAK", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


def phase(name: str, argv: list[str]) -> dict:
    """Run one command in a child process (under a small wrapper, whose only child it is, so that
    ``ru_maxrss`` is that command's own peak); its wall time and peak resident memory."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", WRAP, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    peak = int(result.stdout.strip().splitlines()[-1].split()[1]) * 1024
    return {"phase": name, "seconds": seconds, "peak": peak}


def dry_run_memory(argv: list[str]) -> str:
    """The ``memory`` line of ``difftune train --dry-run``: the run's estimated memory per process."""
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"dry run failed:\n{result.stderr[-3000:]}")
    return next(line.strip() for line in result.stdout.splitlines() if line.strip().startswith("memory"))


STOCK = """
import sys, torch
from diffusers import DiTPipeline
pipe = DiTPipeline.from_pretrained(sys.argv[1])
image = pipe(class_labels=[0], num_inference_steps=2, generator=torch.manual_seed(0)).images[0]
print(image.size)
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(DIT), default="dit-xl2")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="difftune-real-size-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        parameters = build_pipeline(work / "model", args.size)
        random_images(work / "data")
        sets = [
            f"model.pretrained={work / 'model'}",
            f"data.path={work / 'data'}",
            f"bank.path={work / 'bank'}",
            "bank.num_samples=2",
            "bank.batch_size=2",
            "bank.sampling.steps=2",
            f"train.output_dir={work / 'run'}",
            "train.batch_size=2",
            "objective.bank_share=0.5",
            "train.checkpoint_every=0",
            "train.keep_checkpoints=1",  # a DiT-XL/2 checkpoint is about 18 GB
            "train.sample_every=0",
            "train.log_every=1",
        ]
        cli = [sys.executable, "-m", "difftune"]
        config = ["--config", str(RECIPE), *(f"--set={item}" for item in sets)]
        rows = [phase("bank", [*cli, "bank", *config])]
        print(
            f"{'bank':<20} {rows[0]['seconds']:8.1f} s   peak RSS {rows[0]['peak'] / GIB:6.2f} GiB",
            flush=True,
        )
        estimate = dry_run_memory([*cli, "train", *config, "--set=train.max_steps=2", "--dry-run"])
        print(estimate, flush=True)
        for name, command in [
            ("train 2 steps", [*cli, "train", *config, "--set=train.max_steps=2"]),
            (
                "resume to step 3",
                [*cli, "train", *config, "--set=train.max_steps=3", "--set=train.resume=latest"],
            ),
            (
                "sample",
                [
                    *cli,
                    "sample",
                    "--model",
                    str(work / "run" / "final"),
                    "--labels",
                    "0",
                    "--per-label",
                    "1",
                    "--steps",
                    "2",
                    "--out",
                    str(work / "samples"),
                ],
            ),
            ("stock DiTPipeline", [sys.executable, "-c", STOCK, str(work / "run" / "final")]),
        ]:
            row = phase(name, command)
            rows.append(row)
            print(f"{name:<20} {row['seconds']:8.1f} s   peak RSS {row['peak'] / GIB:6.2f} GiB", flush=True)
    trained = rows[1]["peak"]
    estimated = float(estimate.split("about ")[1].split(" GiB")[0]) * GIB if " GiB per" in estimate else 0.0
    print(
        f"ratio estimated/measured train peak {estimated / trained:.3f} (the estimate is device memory: it "
        "leaves out the Python process, the data and the allocator)"
    )
    print(
        f"transformer parameters {parameters:,} ({parameters / ORIGINAL_PARAMETERS[args.size]:.3f} x the "
        f"original DiT's {ORIGINAL_PARAMETERS[args.size]:,}: diffusers keeps an embedder per block)"
    )
    print(json.dumps({"size": args.size, "parameters": parameters, "estimate": estimate, "phases": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
