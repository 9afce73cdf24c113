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

Stable Diffusion 1.5 (``--size sd15``: text-to-image, ``configs/paper/sd15_text_to_image.yaml``;
``--size sd15-controlnet``: a Canny ControlNet, ``configs/paper/sd15_controlnet_canny.yaml``). The
pipeline is ``gpu_throughput.build_sd``'s: SD 1.5's ``UNet2DConditionModel`` (the published
``runwayml/stable-diffusion-v1-5`` configuration, ``gpu_throughput.SD15_UNET``), the SD-VAE, CLIP
ViT-L/14's text model (``CLIPTextModel``: 768 wide, 12 layers, 12 heads, 3072 MLP, 49408 tokens, 77
positions) with a tokenizer built here (character-level, nothing downloaded) and SD 1.5's noise
schedule (scaled_linear 0.00085-0.012, 1000 steps), saved as a ``StableDiffusionPipeline`` folder
(no safety checker, no feature extractor); the ControlNet run names ``model.controlnet: from_unet``
as the recipe does (``ControlNetModel.from_unet``). The data: four random 512-px images with
captions (``metadata.jsonl``; the ControlNet recipe extracts their Canny edges itself). The phases are
the same, with ``difftune sample --prompt`` (and ``--control-image``, the Canny edges of a target
image) and the stock ``StableDiffusionPipeline`` / ``StableDiffusionControlNetPipeline`` (with
``ControlNetModel.from_pretrained(final/controlnet)``). Besides the model, data, output and step
counts, a run sets ``train.gradient_accumulation=1`` (the recipes accumulate micro-batches of 4 or 8
images; the batch here is 2) and, for the ControlNet, ``train.validation_every=0`` (the recipe's
step-0 fidelity check samples 16 images). ``--set KEY=VALUE`` adds overrides (e.g. a lighter memory
path: ``train.optimizer=adamw_8bit``, ``train.ema_decay=0``, ``train.gradient_checkpointing=true``);
``--max-estimate-gib`` stops before training when the dry run's estimate is above it.
``--size sd15-tiny`` / ``sd15-controlnet-tiny`` build the same pipeline with tiny configurations
(``gpu_throughput``'s ``tiny``, 32-px images) for a quick check.

    python benchmarks/real_size.py --size sd15 --set train.optimizer=adamw_8bit   # 15.2 GiB peak, 20 min
    python benchmarks/real_size.py --size sd15-controlnet   # SD 1.5 + a Canny ControlNet: 12.7 GiB, 16 min

(the text-to-image recipe as shipped, fp32 AdamW with an EMA, is estimated at 18.38 GiB by its dry run;
with ``adamw_8bit`` at 13.58 GiB. Measured on 2 CPU cores: benchmarks/README.md.)
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
SD_RECIPES = {
    "sd15": ROOT / "configs" / "paper" / "sd15_text_to_image.yaml",
    "sd15-controlnet": ROOT / "configs" / "paper" / "sd15_controlnet_canny.yaml",
}
# the Stable Diffusion sizes: (recipe, gpu_throughput's size of the models, image side, ControlNet)
SD = {
    "sd15": ("sd15", "real", 512, False),
    "sd15-controlnet": ("sd15-controlnet", "real", 512, True),
    "sd15-tiny": ("sd15", "tiny", 32, False),
    "sd15-controlnet-tiny": ("sd15-controlnet", "tiny", 32, True),
}
SD15_UNET_PARAMETERS = 859_520_964  # runwayml/stable-diffusion-v1-5's UNet
PROMPT = "a photo of a red house, number 0"
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
    lines = result.stdout.strip().splitlines()
    peak = int(lines[-1].split()[1]) * 1024
    return {"phase": name, "seconds": seconds, "peak": peak, "stdout": "\n".join(lines[-2:-1])}


def build_sd_pipeline(root: Path, size: str) -> dict[str, int]:
    """Save the random-init Stable Diffusion pipeline of ``size`` under ``root`` (``gpu_throughput.build_sd``:
    nothing downloaded); the parameters of its UNet and of ``ControlNetModel.from_unet`` (built on the
    meta device: a run builds its own), and the text encoder's width."""
    import gc

    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_throughput

    models = SD[size][1]
    gpu_throughput.build_sd(root, models, seed=0, device="cpu")
    gc.collect()
    text = gpu_throughput.TEXT_SIZES[models]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        controlnet = ControlNetModel.from_unet(unet)
    return {
        "unet": sum(p.numel() for p in unet.parameters()),
        "controlnet": sum(p.numel() for p in controlnet.parameters()),
        "text_encoder_width": text["hidden"],
    }


def captioned_images(root: Path, side: int) -> Path:
    """Four random ``side``-px images and their captions (``metadata.jsonl``), as ``sd_cache_bench`` writes them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sd_cache_bench

    return sd_cache_bench.write_captioned_folder(root, 4, side, seed=0)


def canny_control(image: Path, out: Path) -> Path:
    """The Canny edges of ``image``, as the recipe's annotator extracts them, saved as ``out``."""
    import numpy as np
    import torch
    from PIL import Image

    from difftune.control.annotators import build_annotator

    pixels = torch.from_numpy(np.asarray(Image.open(image).convert("RGB"), np.float32)).permute(2, 0, 1)
    edges = build_annotator("canny")(pixels.unsqueeze(0) / 127.5 - 1)[0]
    Image.fromarray((edges.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(out)
    return out


def estimate_bytes(line: str) -> float:
    """The total of the dry run's ``memory`` line in bytes (``about 12.34 GiB`` or ``about 56.7 MiB``)."""
    value, unit = line.split("about ")[1].split()[:2]
    return float(value) * {"GiB": GIB, "MiB": 2**20, "KiB": 2**10}.get(unit, 1)


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


STOCK_SD = """
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
image = pipe(sys.argv[2], num_inference_steps=2, generator=torch.manual_seed(0)).images[0]
print(type(pipe).__name__, image.size)
"""
STOCK_CONTROLNET = """
import sys, torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image
controlnet = ControlNetModel.from_pretrained(sys.argv[1] + "/controlnet")
pipe = StableDiffusionControlNetPipeline.from_pretrained(sys.argv[1], controlnet=controlnet)
control = Image.open(sys.argv[3])
image = pipe(sys.argv[2], control, num_inference_steps=2, generator=torch.manual_seed(0)).images[0]
print(type(pipe).__name__, image.size)
"""


def show(row: dict) -> None:
    print(f"{row['phase']:<24} {row['seconds']:8.1f} s   peak RSS {row['peak'] / GIB:6.2f} GiB", flush=True)


def phase_overrides(work: Path, data: Path) -> list[str]:
    """The overrides every size's recipe runs with: the model, data and folders under ``work``, a bank of
    2 samples of 2 steps, batch 2 (1 target + 1 bank), one checkpoint kept (a DiT-XL/2 one is about 18 GB)."""
    return [
        f"model.pretrained={work / 'model'}",
        f"data.path={data}",
        f"bank.path={work / 'bank'}",
        "bank.num_samples=2",
        "bank.batch_size=2",
        "bank.sampling.steps=2",
        f"train.output_dir={work / 'run'}",
        "train.batch_size=2",
        "objective.bank_share=0.5",
        "train.checkpoint_every=0",
        "train.keep_checkpoints=1",
        "train.sample_every=0",
        "train.log_every=1",
    ]


def run_sd(args: argparse.Namespace, work: Path) -> int:
    """The Stable Diffusion sizes (see the module docstring)."""
    recipe, _, side, controlnet = SD[args.size]
    parameters = build_sd_pipeline(work / "model", args.size)
    data = captioned_images(work / "data", side)
    sets = [*phase_overrides(work, data), "train.gradient_accumulation=1"]
    if side != 512:
        sets.append(f"data.resolution={side}")
    if controlnet:
        sets.append("train.validation_every=0")
    sets += args.set
    print("overrides: " + " ".join(sets[1:]).replace(str(work) + "/", ""), flush=True)
    cli = [sys.executable, "-m", "difftune"]
    config = ["--config", str(SD_RECIPES[recipe]), *(f"--set={item}" for item in sets)]
    rows = [phase("bank", [*cli, "bank", *config])]
    show(rows[0])
    estimate = dry_run_memory([*cli, "train", *config, "--set=train.max_steps=2", "--dry-run"])
    print(estimate, flush=True)
    if args.max_estimate_gib and estimate_bytes(estimate) > args.max_estimate_gib * GIB:
        print(f"estimate above --max-estimate-gib {args.max_estimate_gib}: not trained", flush=True)
        print(json.dumps({"size": args.size, "parameters": parameters, "estimate": estimate, "phases": rows}))
        return 2
    final = work / "run" / "final"
    sample = [*cli, "sample", "--model", str(final), "--prompt", PROMPT, "--per-label", "1", "--steps", "2"]
    sample += ["--out", str(work / "samples")]
    stock = [sys.executable, "-c", STOCK_CONTROLNET if controlnet else STOCK_SD, str(final), PROMPT]
    if controlnet:
        control = canny_control(data / "00000.png", work / "control.png")
        sample += ["--control-image", str(control)]
        stock.append(str(control))
    stock_name = "stock SD+ControlNet pipe" if controlnet else "stock SD pipeline"
    for name, command in [
        ("train 2 steps", [*cli, "train", *config, "--set=train.max_steps=2"]),
        (
            "resume to step 3",
            [*cli, "train", *config, "--set=train.max_steps=3", "--set=train.resume=latest"],
        ),
        ("sample", sample),
        (stock_name, stock),
    ]:
        row = phase(name, command)
        rows.append(row)
        show(row)
        if command is stock:
            print(f"stock pipeline loaded: {row['stdout'].strip()}", flush=True)
    trained = rows[1]["peak"]
    print(
        f"ratio estimated/measured train peak {estimate_bytes(estimate) / trained:.3f} (the estimate is device "
        "memory: it leaves out the Python process, the data and the allocator)"
    )
    trained_what = "controlnet" if controlnet else "unet"
    print(
        f"UNet parameters {parameters['unet']:,}"
        + (
            f" ({parameters['unet'] / SD15_UNET_PARAMETERS:.3f} x SD 1.5's {SD15_UNET_PARAMETERS:,})"
            if side == 512
            else ""
        )
        + f"; ControlNet.from_unet {parameters['controlnet']:,}; trained: the {trained_what}"
    )
    print(json.dumps({"size": args.size, "parameters": parameters, "estimate": estimate, "phases": rows}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(DIT) + list(SD), default="dit-xl2")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="another override (SD sizes)"
    )
    p.add_argument(
        "--max-estimate-gib", type=float, help="SD sizes: stop before training above this estimate"
    )
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="difftune-real-size-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.size in SD:
            return run_sd(args, work)
        parameters = build_pipeline(work / "model", args.size)
        random_images(work / "data")
        sets = phase_overrides(work, work / "data")
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
