"""Training throughput of real-size models through the real Trainer: images/s, MFU and peak memory.

Three models are built from their published configurations with random weights (nothing is
downloaded) and trained by :class:`difftune.training.loop.Trainer` itself, with plain fine-tuning and
with Diff-Tuning, under bf16 mixed precision (``train.mixed_precision: bf16``):

==============  ==========================================================================  =========
model           what is built (``--size real``)                                             batch
==============  ==========================================================================  =========
``dit-xl2``     DiT-XL/2 at 256 px: ``DiTTransformer2DModel`` with ``facebook/DiT-XL-2-256``'s  128
                configuration (``real_size.DIT``), 4x32x32 latents of the SD-VAE
                (``real_size.SD_VAE``); target: digits 5-9 as 256 px images, encoded once
``sd15-unet``   the Stable Diffusion 1.5 UNet at 512 px: ``UNet2DConditionModel`` with                32
                ``runwayml/stable-diffusion-v1-5``'s configuration (:data:`SD15_UNET`), 4x64x64
                latents, a CLIP ViT-L/14 text encoder (77x768 prompt embeddings, cached with
                the latents as a run caches them); target: random captioned 512 px images
``controlnet``  a ControlNet on that UNet (``model.controlnet: from_unet``:                          32
                ``ControlNetModel.from_unet``; the UNet frozen), canny control images
==============  ==========================================================================  =========

``--size tiny`` builds small versions of the same three (same code path, tiny configurations), for a
CPU check of the script. Each model gets a knowledge bank generated once by itself (``--bank-samples``
samples of ``--bank-steps`` sampling steps) and its target set encoded once into a cache.

Rows. Per model, two runs that differ only in the ``objective`` section, as in ``step_time.py``
(:data:`step_time.METHODS`): ``plain`` (``target_schedule: uniform``, ``bank_share: 0``) and
``diff-tuning`` (the objective defaults: ``bank_share: 0.2``, ``power_up`` / ``power_down``); full
fine-tuning, AdamW (``--optimizer adamw_fused`` sets ``train.optimizer``), EMA on (``ema_decay``
default), ``--compile regional`` sets ``train.compile``. Both rows of a model run at the same global
batch (target + bank rows): ``--batch-size`` (per model: ``MODEL=N``, or one N for all), or with
``--auto-batch`` the largest batch found by doubling from it until the device runs out of memory, then
backing off (one bisection step between the last batch that fitted and the first that did not). The
probes are 2-step runs of the Diff-Tuning row with ``train.compile: no`` (compiling each probe would
take minutes; a compiled step rarely needs more memory than an eager one); a measured row that still
runs out of memory is reported as ``OOM``.

How a row is measured: one fresh ``Trainer`` (its set-up, the model's loading and the target's
encoding happen in the constructor, outside every clock) runs ``train()`` for
``warmup + steps + 1`` steps. Its ``_optimizer_step`` is wrapped from outside (nothing else changes)
to take a timestamp as steps ``0``, ``warmup`` and ``warmup + steps`` begin, with CUDA synchronised
at those three points only, so the host queues the steps in between as in a real run. The steady
interval covers ``steps`` whole loop iterations (batch, forward, backward, optimiser step, EMA update,
bookkeeping); images/s = batch x steps / that interval. The warm-up interval (the first forward, the
allocator, with ``--compile`` the compilation; the second row of a model may reuse the code the
first compiled in this process, so its warm-up understates a cold compile) is printed beside it.
At the start of step
``warmup + steps`` the wrapper ends the run by raising, so no checkpoint is written (a real-size
checkpoint is 10-18 GB); ``train()``'s own clean-up still runs. Peak memory is
``torch.cuda.max_memory_allocated()`` over ``train()`` (``peft_bench.cuda_probe``): the weights,
gradients, AdamW's moments, the EMA, the autocast copies and the activations; not measured on a CPU.
Beside it, ``est``: difftune's own estimate of the same run (``estimate_training_memory``, what
``difftune train --dry-run`` prints), so that a GPU run also checks the estimate. The default batches
were chosen with it for an 80 GB H100 (about 58, 45 and 37 GiB; DiT-XL/2 at batch 256 is estimated at
about 104 GiB, which an H200 holds).

MFU (model FLOPs utilisation): the forward FLOPs of one sample are counted with
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (the run's backbone adapter built from
the saved configurations by ``peek_backbone``, full tuning applied, one unconditional sample; attention
counted as the two matrix products of its math form, no recomputation). ``MFU`` = 3 x forward FLOPs x
images/s / peak, the usual convention (forward + backward = 3 x forward), in which the anchors below
are quoted. ``MFU cnt`` uses the FLOPs counted over the forward and the backward pass of that sample
instead: the same within a fraction of a percent for DiT and the UNet, but about 30% lower for the
ControlNet, whose frozen UNet computes no weight gradients (3 x forward overstates its work). The
peak is ``--peak-tflops``, else the dense bf16 tensor-core peak of the device named by
``torch.cuda.get_device_name()`` in :data:`PEAK_TFLOPS` (H100 SXM / H200 / H800: 989, H100 PCIe: 756,
H100 NVL: 835, A100: 312); on another device, or a CPU, MFU needs ``--peak-tflops``.

Anchors printed beside the DiT-XL/2 rows (``--size real``), each also converted with this script's
FLOP count: about 285 images/s per H800-class GPU for LightningDiT (about 20% MFU); fast-DiT at 33%
MFU on an A100; the bf16 bound with cached latents, about 1,100 images/s on an H100.

Printed: the device and its peak, versions, settings; one line per model (parameters, trainable
parameters, latents, FLOPs per image); the table (model, method, batch, images/s, ms/step, warm-up
seconds, MFU, MFU cnt, peak memory, estimated memory); the anchors; and last, one line per model
``ratio diff-tuning/plain images_per_s <r> (<model>)``. ``--json OUT`` writes the same figures.

How to run. On an H100 or H200 (from the repository root, the project's venv active)::

    python benchmarks/gpu_throughput.py --device cuda                  # all three, default batches
    python benchmarks/gpu_throughput.py --device cuda --auto-batch --compile regional \\
        --optimizer adamw_fused --json throughput.json
    python benchmarks/gpu_throughput.py --device cuda --models dit-xl2 --batch-size dit-xl2=256   # H200

Expect a few minutes for building, saving and loading the real-size models (about 4 GB each) and
generating the banks, then about half a minute per row at the default ``--steps 20 --warmup 5``
(longer with ``--compile`` or ``--auto-batch``); about 8 GB of disk in a temporary directory. The
CPU check (tiny models, seconds; its figures are a smoke test, not a measurement)::

    python benchmarks/gpu_throughput.py --size tiny --device cpu --steps 2 --warmup 1 --peak-tflops 1

This script has NOT been run on a GPU yet: it was written and checked in a session without one
(only the tiny CPU check above ran). The real-size FLOP counts were checked on the meta device:
DiT-XL/2 237.3 GFLOP forward per image (the DiT paper's 118.6 GFLOPs are multiply-adds), the SD 1.5
UNet 803 GFLOP, the ControlNet with its UNet 1,087 GFLOP.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peft_bench  # noqa: E402
import real_size  # noqa: E402
import sd_cache_bench  # noqa: E402
import step_time  # noqa: E402

if TYPE_CHECKING:
    from difftune.config.experiment import ExperimentConfig

MODELS = ("dit-xl2", "sd15-unet", "controlnet")
SIZES = ("real", "tiny")
METHODS = tuple(step_time.METHODS)  # plain, diff-tuning
DEFAULT_BATCH = {
    # H100 80 GB: difftune's own estimate (train --dry-run) is about 58 / 45 / 37 GiB at these batches;
    # DiT-XL/2 at 256 is about 104 GiB (an H200 holds it: --batch-size dit-xl2=256)
    "real": {"dit-xl2": 128, "sd15-unet": 32, "controlnet": 32},
    "tiny": {"dit-xl2": 8, "sd15-unet": 8, "controlnet": 8},
}
# dense bf16 tensor-core peak in TFLOP/s, by a substring of torch.cuda.get_device_name(); first match wins
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),  # also GH200
    ("H800", 989.0),
    ("A100", 312.0),
)
GIB = 2**30
BANK_BATCH = 8  # bank generation batch: a ControlNet bank decodes its samples at 512 px to annotate them

# DiT: the published DiT-XL/2 (real_size.DIT) on 4x32x32 latents; tiny: 2 layers of width 16 on 4x4x4
DIT_COMMON = {"in_channels": 4, "out_channels": 8, "patch_size": 2, "norm_type": "ada_norm_zero"}
DIT_SIZES: dict[str, dict[str, Any]] = {
    "real": {**real_size.DIT["dit-xl2"], "sample_size": 32, "num_embeds_ada_norm": 1000},
    "tiny": {
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "num_layers": 2,
        "sample_size": 4,
        "num_embeds_ada_norm": 10,
        "norm_num_groups": 1,
    },
}
# runwayml/stable-diffusion-v1-5's unet/config.json (its non-default entries spelled out)
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
}
UNET_SIZES: dict[str, dict[str, Any]] = {
    "real": SD15_UNET,
    "tiny": {  # tiny_models.tiny_cond_unet's layout
        "sample_size": 4,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (16, 32),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    },
}
# CLIP ViT-L/14's text encoder (SD 1.5's), with the tiny character-level tokenizer (ids < 200)
TEXT_SIZES: dict[str, dict[str, int]] = {
    "real": {
        "hidden": 768,
        "intermediate": 3072,
        "layers": 12,
        "heads": 12,
        "max_length": 77,
        "vocab": 49408,
    },
    "tiny": {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2, "max_length": 16, "vocab": 0},
}
VAE_SIZES: dict[str, dict[str, Any]] = {
    "real": real_size.SD_VAE,
    "tiny": {  # tiny_models.tiny_vae: 8x downsampling
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (8, 8, 8, 8),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "norm_num_groups": 4,
        "layers_per_block": 1,
    },
}
# SD 1.5's training noise schedule
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
    "clip_sample": False,
}
# anchors quoted beside the DiT-XL/2 rows: (what, images/s or None, MFU or None, peak TFLOP/s of its GPU)
ANCHORS = (
    ("LightningDiT, per H800-class GPU", 285.0, 0.20, 989.0),
    ("fast-DiT, on an A100", None, 0.33, 312.0),
    ("bf16 bound with cached latents, on an H100", 1100.0, None, 989.0),
)


# -- options ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=SIZES, default="real", help="model sizes (default %(default)s)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="default: all three")
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available"
    )
    p.add_argument(
        "--batch-size",
        nargs="+",
        default=[],
        metavar="[MODEL=]N",
        help="global batch (target + bank): one N for every model, or MODEL=N per model "
        f"(defaults, real size: {', '.join(f'{m}={b}' for m, b in DEFAULT_BATCH['real'].items())})",
    )
    p.add_argument(
        "--auto-batch",
        action="store_true",
        help="double each model's batch from --batch-size until out of memory, then back off (CUDA only)",
    )
    p.add_argument("--max-batch", type=int, default=8192, help="--auto-batch goes no higher")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (steady state)")
    p.add_argument("--warmup", type=int, default=5, help="steps before the timed ones")
    p.add_argument("--compile", choices=["no", "full", "regional"], default="no", help="train.compile")
    p.add_argument(
        "--optimizer", choices=["adamw", "adamw_fused", "adamw_8bit"], default="adamw", help="train.optimizer"
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's peak dense bf16 FLOP/s in TFLOP/s (default: from the device's name; "
        + ", ".join(f"{name} {value:g}" for name, value in PEAK_TFLOPS)
        + ")",
    )
    p.add_argument("--bank-samples", type=int, default=64, help="knowledge-bank size per model")
    p.add_argument("--bank-steps", type=int, default=2, help="sampling steps used to generate each bank")
    p.add_argument("--images", type=int, default=32, help="target images per model (digits: per class / 5)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op CPU threads (default 1; 0 = torch's default)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    p.add_argument("--verbose", action="store_true", help="let library output and progress bars through")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.bank_samples < 1 or args.images < 5:
        p.error("--steps, --warmup and --bank-samples must be >= 1, --images >= 5")
    try:
        args.batches = batch_sizes(args.batch_size, args.size)
    except ValueError as err:
        p.error(str(err))
    if any(b < 5 for b in args.batches.values()):
        p.error("--batch-size must be >= 5 (Diff-Tuning's 20% bank share needs one bank row)")
    if args.auto_batch and args.device == "cpu":
        p.error("--auto-batch probes a GPU's memory: use it with --device cuda")
    return args


def batch_sizes(items: list[str], size: str) -> dict[str, int]:
    """Each model's batch: the size's defaults, replaced by ``N`` (all models) or ``MODEL=N`` items."""
    batches = dict(DEFAULT_BATCH[size])
    for item in items:
        model, _, value = item.rpartition("=")
        if model and model not in MODELS:
            raise ValueError(f"--batch-size {item}: unknown model {model!r}; valid: {', '.join(MODELS)}")
        if not value.isdigit():
            raise ValueError(f"--batch-size {item}: expected N or MODEL=N with N a positive integer")
        for name in [model] if model else MODELS:
            batches[name] = int(value)
    return batches


def search_batch(start: int, fits: Callable[[int], bool], limit: int) -> int:
    """The batch ``--auto-batch`` settles on: from ``start``, halve until one fits, or double while the
    next fits (up to ``limit``); then try once halfway (a multiple of 8) between the largest that fitted
    and the first that did not. 0 when not even a batch of 5 fits."""
    good = start
    if not fits(good):
        bad = good
        while True:
            good = bad // 2
            if good < 5:
                return 0
            if fits(good):
                break
            bad = good
    else:
        while 2 * good <= limit and fits(2 * good):
            good *= 2
        bad = 2 * good if 2 * good <= limit else 0
        if not bad:
            return good
    middle = (good + bad) // 2 // 8 * 8
    if good < middle < bad and fits(middle):
        good = middle
    return good


def peak_tflops(args: argparse.Namespace, device: str) -> tuple[float | None, str]:
    """The peak used for MFU and where it comes from."""
    import torch

    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device != "cuda":
        return None, "none for a CPU: give --peak-tflops"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value, f"dense bf16 peak of {key}"
    return None, f"{name} is not in the table: give --peak-tflops"


# -- the models, their data and banks ---------------------------------------------------------------


@dataclass
class Model:
    """One model of the table: its saved pipeline, bank and target cache (``setup``), the data and
    model settings of its runs, its batch and its FLOP counts."""

    name: str
    setup: step_time.Setup
    data: dict[str, Any]
    controlnet: str | None
    batch: int
    flops_forward: float = 0.0
    flops_counted: float = 0.0  # forward + backward
    parameters: int = 0
    trainable: int = 0
    latents: tuple[int, ...] = ()
    estimate_bytes: int | None = None  # difftune's memory estimate of a run at ``batch`` (train --dry-run)


def build_dit(root: Path, size: str, seed: int, device: str) -> tuple[Path, str]:
    """A random-init DiT (DiT-XL/2's configuration at ``real``), its VAE and DDPM schedule under ``root``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    config = DIT_SIZES[size]
    with torch.device(device):  # random initialisation of a real-size model is much faster on a GPU
        DiTTransformer2DModel(**DIT_COMMON, **config).save_pretrained(root / "transformer")
        AutoencoderKL(**VAE_SIZES[size], sample_size=8 * config["sample_size"]).save_pretrained(root / "vae")
    DDPMScheduler(beta_schedule="linear", num_train_timesteps=1000).save_pretrained(root / "scheduler")
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = (config["sample_size"] // 2) ** 2
    return root, f"DiT hidden {hidden}, {config['num_layers']} layers, {tokens} tokens"


def build_sd(root: Path, size: str, seed: int, device: str) -> tuple[Path, str]:
    """A random-init Stable Diffusion pipeline (SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder at
    ``real``) under ``root``, with the tiny character-level tokenizer (nothing is downloaded)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftune.testing.models import tiny_text_encoder

    t, unet_config = TEXT_SIZES[size], UNET_SIZES[size]
    _, tokenizer = tiny_text_encoder(max_length=t["max_length"], seed=seed)
    torch.manual_seed(seed)
    with torch.device(device):
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=max(t["vocab"], len(tokenizer)),
                hidden_size=t["hidden"],
                intermediate_size=t["intermediate"],
                num_hidden_layers=t["layers"],
                num_attention_heads=t["heads"],
                max_position_embeddings=t["max_length"],
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**VAE_SIZES[size], sample_size=8 * unet_config["sample_size"])
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**SD_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(root)
    blocks = tuple(unet_config["block_out_channels"])
    return root, f"UNet {blocks}, text encoder {t['max_length']}x{t['hidden']}"


def count_flops(model: Model) -> None:
    """Forward, and forward + backward, FLOPs of one sample on the meta device; parameters (see the
    module docstring)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from difftune.backbones.loading import peek_backbone
    from difftune.config.experiment import section_from_dict
    from difftune.training.memory_estimate import _meta_condition
    from difftune.tuning import build_tuning

    backbone = peek_backbone(str(model.setup.source), controlnet=model.controlnet)
    trainable = build_tuning("full", section_from_dict("tuning", {})).prepare(backbone)
    model.parameters = sum(p.numel() for p in backbone.parameters())
    model.trainable = sum(p.numel() for p in trainable)
    model.latents = tuple(backbone.sample_shape)
    cond = _meta_condition(backbone, 1)  # the empty prompt of CLIP's length for a text model
    with torch.device("meta"):
        x_t = torch.zeros(1, *backbone.sample_shape)
        t = torch.zeros(1, dtype=torch.long)
    backbone.train()
    with FlopCounterMode(display=False) as forward:
        out = backbone(x_t, t, cond)
    with FlopCounterMode(display=False) as backward:
        out.float().square().mean().backward()
    model.flops_forward = float(forward.get_total_flops())
    model.flops_counted = model.flops_forward + float(backward.get_total_flops())


def prepare_model(name: str, args: argparse.Namespace, work: Path, device: str, sd: Path | None) -> Model:
    """Build (or reuse: the ControlNet steers the SD pipeline) the model, write its target data,
    generate its bank once and count its FLOPs."""
    from difftune.backbones import load_pretrained
    from difftune.bank import generate_bank
    from difftune.bank.conditions import prepare_bank_conditions

    root = work / name
    root.mkdir(parents=True)
    if name == "dit-xl2":
        source, description = build_dit(work / "dit", args.size, args.seed, device)
        # digits 5-9 (step_time's target), resized to the model's 256 px (real) by the encoder
        data: dict[str, Any] = {"per_class": max(1, args.images // len(step_time.TARGET_CLASSES))}
    else:
        if sd is None:
            sd, _ = build_sd(work / "sd", args.size, args.seed, device)
        source, description = sd, ""
        side = 8 * UNET_SIZES[args.size]["sample_size"]
        folder = sd_cache_bench.write_captioned_folder(root / "captioned", args.images, side, args.seed)
        data = {"source": "captions", "path": str(folder), "classes": None}
        if name == "controlnet":
            data["annotator"] = "canny"
    controlnet = "from_unet" if name == "controlnet" else None
    setup = step_time.Setup(source, root / "bank", root / "target_cache", description, device)
    model = Model(name, setup, data, controlnet, args.batches[name])
    cfg = run_config(model, "diff-tuning", args, root / "bank-run", 1)
    loaded = load_pretrained(str(source), controlnet=controlnet)
    with quiet(args):
        # a text model's prompts (the captions), a ControlNet's annotator (canny)
        prepare_bank_conditions(loaded, cfg)
        bank = dataclasses.replace(cfg.bank, batch_size=BANK_BATCH)  # the batch does not change the bank
        generate_bank(loaded, bank, device=device, progress=args.verbose)
    del loaded
    release(device)
    count_flops(model)
    if not description:
        unet = UNET_SIZES[args.size]
        t = TEXT_SIZES[args.size]
        what = "ControlNet.from_unet over a frozen " if controlnet else ""
        model.setup.description = (
            f"{what}UNet {tuple(unet['block_out_channels'])}, prompts {t['max_length']}x{t['hidden']}"
        )
    return model


def estimate_memory(model: Model, args: argparse.Namespace, work: Path) -> None:
    """difftune's own estimate of a run's device memory at the model's batch (what ``difftune train
    --dry-run`` prints: :func:`~difftune.training.memory_estimate.estimate_training_memory`), to set
    beside the measured peak."""
    from difftune.backbones.loading import peek_backbone
    from difftune.training.memory_estimate import estimate_training_memory

    cfg = run_config(model, "diff-tuning", args, work / "estimate", 1)
    backbone = peek_backbone(str(model.setup.source), controlnet=model.controlnet)
    model.estimate_bytes = estimate_training_memory(cfg, backbone, model.setup.source).total


def run_config(
    model: Model, method: str, args: argparse.Namespace, out: Path, max_steps: int, batch: int | None = None
) -> ExperimentConfig:
    """``step_time.make_config`` for ``method`` with this model's data, ControlNet and batch, and the
    benchmark's ``train`` settings (bf16, optimizer, compile; no tracker)."""
    from difftune.config.experiment import ModelConfig

    run = step_time.Run(objective=step_time.METHODS[method], data=model.data)
    row_args = argparse.Namespace(**{**vars(args), "batch_size": batch or model.batch})
    cfg = step_time.make_config(model.setup, run, row_args, out, max_steps)
    train = dataclasses.replace(
        cfg.train,
        mixed_precision="bf16",
        optimizer=args.optimizer,
        compile=args.compile,
        report_to="none",
    )
    return dataclasses.replace(
        cfg, model=ModelConfig(pretrained=str(model.setup.source), controlnet=model.controlnet), train=train
    )


# -- one measured run -------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the step wrapper once the timed steps are done: the run ends without a checkpoint."""


@dataclass
class RowResult:
    model: str
    method: str
    batch: int
    images_per_s: float | None = None  # None: out of memory
    ms_per_step: float | None = None
    warmup_s: float | None = None
    peak_bytes: int | None = None
    mfu: float | None = None
    mfu_counted: float | None = None


@contextlib.contextmanager
def quiet(args: argparse.Namespace):  # noqa: ANN201
    """The trainer's summary lines (stdout) and bars (stderr) go to buffers unless ``--verbose``."""
    if args.verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def release(device: str) -> None:
    """On a GPU, collect garbage and give cached device memory back (between runs, after an OOM); on
    a CPU nothing (a full collection takes about a second there, for nothing the next run needs)."""
    from accelerate.utils.memory import clear_device_cache

    if device == "cuda":
        gc.collect()
        clear_device_cache(garbage_collection=True)


def fresh_accelerator_state() -> None:
    """Forget accelerate's process-wide state, so that the next ``Accelerator`` may set its own mixed
    precision (accelerate refuses a change of it within a process otherwise)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def timed_run(
    cfg: ExperimentConfig, args: argparse.Namespace, device: str, warmup: int, steps: int
) -> tuple[list[float], int | None] | None:
    """Train ``cfg`` (``max_steps`` = ``warmup + steps + 1``) and stop as step ``warmup + steps``
    begins: the times at which steps 0, ``warmup`` and ``warmup + steps`` began, and the peak device
    memory (CUDA); ``None`` when the device ran out of memory."""
    import shutil

    import torch
    from accelerate.utils.memory import should_reduce_batch_size

    from difftune.training.loop import Trainer

    cuda = device == "cuda"
    marks: list[float] = []
    seen = peft_bench.Observed()
    failed = False
    fresh_accelerator_state()
    trainer = None
    try:
        with quiet(args):
            trainer = Trainer(cfg)
            original, count = trainer._optimizer_step, [0]

            def timed(*a: Any, **k: Any) -> float:
                n = count[0]
                count[0] += 1
                if n in (0, warmup, warmup + steps):
                    if cuda:
                        torch.cuda.synchronize()
                    marks.append(time.perf_counter())
                if n == warmup + steps:
                    raise _Stop
                return original(*a, **k)

            trainer._optimizer_step = timed
            probe = peft_bench.cuda_probe(trainer, seen) if cuda else contextlib.nullcontext()
            with probe, contextlib.suppress(_Stop):  # _Stop: the wrapper's end of the run, inside the probe
                trainer.train()
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
        if not (isinstance(err, torch.cuda.OutOfMemoryError) or should_reduce_batch_size(err)):
            raise
        failed = True
    del trainer
    release(device)
    fresh_accelerator_state()
    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)
    if failed:
        return None
    return marks, (seen.peak[-1] if seen.peak else None)


def measure_row(
    model: Model, method: str, args: argparse.Namespace, work: Path, peak: float | None
) -> RowResult:
    row = RowResult(model.name, method, model.batch)
    out = work / "runs" / f"{model.name}-{method}"
    cfg = run_config(model, method, args, out, args.warmup + args.steps + 1)
    result = timed_run(cfg, args, model.setup.device, args.warmup, args.steps)
    if result is None:
        return row
    (start, steady, end), row.peak_bytes = result
    seconds = end - steady
    row.images_per_s = model.batch * args.steps / seconds
    row.ms_per_step = 1000 * seconds / args.steps
    row.warmup_s = steady - start
    if peak:
        row.mfu = 3 * model.flops_forward * row.images_per_s / (peak * 1e12)
        row.mfu_counted = model.flops_counted * row.images_per_s / (peak * 1e12)
    return row


def auto_batch(model: Model, args: argparse.Namespace, work: Path) -> int:
    """The largest batch that trains (2 steps of the Diff-Tuning row, compile off) by :func:`search_batch`."""

    def fits(batch: int) -> bool:
        cfg = run_config(model, "diff-tuning", args, work / "runs" / f"{model.name}-probe", 3, batch)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile="no"))
        ok = timed_run(cfg, args, model.setup.device, 2, 0) is not None
        print(f"  auto-batch {model.name}: batch {batch} {'fits' if ok else 'out of memory'}", flush=True)
        return ok

    return search_batch(model.batch, fits, args.max_batch)


# -- the report -------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def percent(share: float | None) -> str:
    """A share as a percentage: one decimal, or three significant digits below 1% (tiny models)."""
    if share is None:
        return "-"
    return f"{100 * share:.1f}%" if share >= 0.01 else f"{100 * share:.3g}%"


def anchor_lines(model: Model) -> list[str]:
    """The DiT-XL/2 anchors, each converted with this script's count of the model's forward FLOPs."""
    per_image = 3 * model.flops_forward
    lines = [
        f"  anchors (DiT-XL/2 256 px; 'here' = by this script's {model.flops_forward / 1e9:.1f} GFLOP forward):"
    ]
    for what, images, mfu, tflops in ANCHORS:
        if images is not None and mfu is not None:
            here = f"{100 * images * per_image / (tflops * 1e12):.1f}% MFU here"
            lines.append(f"    {what}: ~{images:,.0f} img/s at ~{100 * mfu:.0f}% MFU ({here})")
        elif mfu is not None:
            here = f"{mfu * tflops * 1e12 / per_image:,.0f} img/s here"
            lines.append(f"    {what}: {100 * mfu:.0f}% MFU ({here} at {tflops:g} TFLOP/s)")
        else:
            assert images is not None
            here = f"{100 * images * per_image / (tflops * 1e12):.0f}% MFU here"
            lines.append(f"    {what}: ~{images:,.0f} img/s ({here} at {tflops:g} TFLOP/s)")
    return lines


def report(
    args: argparse.Namespace,
    device: str,
    peak: tuple[float | None, str],
    models: list[Model],
    rows: list[RowResult],
) -> dict[str, Any]:
    import torch

    v = sd_cache_bench.versions()
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} thread(s))"
    print("difftune training throughput: plain fine-tuning vs Diff-Tuning (real Trainer.train loop)")
    print(f"device   {device}: {name}; peak {fmt(peak[0], 'g', 'unknown')} TFLOP/s ({peak[1]})")
    print(f"versions torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}")
    print(
        f"settings size {args.size}; train.mixed_precision bf16, optimizer {args.optimizer}, compile "
        f"{args.compile}, EMA on, full tuning; {args.warmup} warm-up + {args.steps} timed steps per row"
        + ("; batches from --auto-batch" if args.auto_batch else "")
    )
    for m in models:
        c, h, w = m.latents
        print(
            f"model    {m.name}: {m.setup.description}; {m.parameters / 1e6:.4g}M parameters, "
            f"{m.trainable / 1e6:.4g}M trained; {c}x{h}x{w} latents; {m.flops_forward / 1e9:.3g} GFLOP "
            f"forward per image, {m.flops_counted / 1e9:.3g} forward+backward "
            f"({m.flops_counted / (3 * m.flops_forward):.2f} x 3 x forward)"
        )
    print()
    header = (
        f"{'model':<12}{'method':<13}{'batch':>6} {'img/s':>9} {'ms/step':>9} {'warm-up s':>10}"
        f" {'MFU':>10} {'MFU cnt':>10} {'peak GiB':>9} {'est GiB':>8}"
    )
    print(header)
    for m in models:
        for row in (r for r in rows if r.model == m.name):
            if row.images_per_s is None:
                print(f"{row.model:<12}{row.method:<13}{row.batch:>6} {'OOM':>9}")
                continue
            mem = None if row.peak_bytes is None else row.peak_bytes / GIB
            est = None if m.estimate_bytes is None else m.estimate_bytes / GIB
            print(
                f"{row.model:<12}{row.method:<13}{row.batch:>6} {row.images_per_s:>9.2f}"
                f" {row.ms_per_step:>9.1f} {row.warmup_s:>10.1f}"
                f" {percent(row.mfu):>10} {percent(row.mfu_counted):>10} {fmt(mem, '.1f'):>9}"
                f" {fmt(est, '.2f'):>8}"
            )
        if m.name == "dit-xl2" and args.size == "real":
            print("\n".join(anchor_lines(m)))
    print("(img/s: target + bank rows per second, steady state; MFU: 3 x forward FLOPs; MFU cnt: counted")
    print(" forward + backward FLOPs; peak: torch.cuda.max_memory_allocated over train(); est: difftune's")
    print(" own estimate of the run, as train --dry-run prints it; see the docstring)")
    ratios: dict[str, float | None] = {}
    for m in models:
        by = {r.method: r.images_per_s for r in rows if r.model == m.name}
        plain, diff = by.get("plain"), by.get("diff-tuning")
        ratios[m.name] = diff / plain if plain and diff else None
    if args.json is not None:
        print(f"json     {args.json}")
    for model_name, ratio in ratios.items():
        print(f"ratio diff-tuning/plain images_per_s {fmt(ratio, '.3f', 'n/a')} ({model_name})")
    return {
        "device": device,
        "device_name": name,
        "peak_tflops": peak[0],
        "peak_source": peak[1],
        "versions": v,
        "size": args.size,
        "settings": {
            "mixed_precision": "bf16",
            "optimizer": args.optimizer,
            "compile": args.compile,
            "warmup": args.warmup,
            "steps": args.steps,
            "auto_batch": args.auto_batch,
        },
        "models": [
            {
                "name": m.name,
                "description": m.setup.description,
                "parameters": m.parameters,
                "trainable": m.trainable,
                "latents": list(m.latents),
                "flops_forward": m.flops_forward,
                "flops_forward_backward": m.flops_counted,
                "batch": m.batch,
                "memory_estimate_bytes": m.estimate_bytes,
            }
            for m in models
        ],
        "rows": [dataclasses.asdict(r) for r in rows],
        "ratios_diff_tuning_over_plain_images_per_s": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    step_time.start(args)
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{Path(sys.argv[0]).name}: --device cuda but CUDA is not available")
    peak = peak_tflops(args, device)
    wall = time.perf_counter()
    models: list[Model] = []
    rows: list[RowResult] = []
    with step_time.scratch(args, "difftune-throughput-") as work:
        sd: Path | None = None
        for name in args.models:
            model = prepare_model(name, args, work, device, sd)
            if name != "dit-xl2":
                sd = model.setup.source
            if args.auto_batch:
                model.batch = auto_batch(model, args, work)
                if not model.batch:
                    print(f"  auto-batch {name}: not even a batch of 5 fits; skipped", flush=True)
            if model.batch:
                estimate_memory(model, args, work)
            models.append(model)
            for method in METHODS:
                if model.batch:
                    rows.append(measure_row(model, method, args, work, peak[0]))
                else:
                    rows.append(RowResult(name, method, 0))
    fresh_accelerator_state()
    result = report(args, device, peak, models, rows)
    result["wall_s"] = time.perf_counter() - wall
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r.images_per_s for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
