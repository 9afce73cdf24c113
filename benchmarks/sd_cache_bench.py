"""Stable Diffusion training step with cached latents and prompt embeddings vs encoding every step.

difftune encodes a text-conditional target set once, before training (``difftune.data.targets.prepare_target``
-> ``encode_and_cache`` with the model family's target conditioner): each image's VAE
posterior mean and std, and its caption's CLIP embedding (float16). A training step then only draws
``mean + std * noise`` and reads the embeddings (``RunParts.batch``). This script measures what that
saves, in one process and one run, on one random-init Stable Diffusion pipeline (nothing downloaded):

* ``cached``: the batch as ``RunParts.batch`` makes it, from the cache that ``prepare_target`` wrote:
  ``TargetData.draw`` (a fresh posterior draw) and the cached embeddings (``cond.select``);
* ``uncached``: every step loads the batch's images from the PNG files of a captioned folder
  (``metadata.jsonl``; ``caption_folder(...).images``, i.e. :func:`difftune.io.images.load_square_image`
  per file, as the cache's encoder reads them), encodes them with the VAE (``LatentCodec.encode``),
  draws ``mean + std * noise``, and encodes the captions with the text encoder (``PromptEncoder.encode``);
* then the same step in both modes: the objective the trainer uses (``build_objective`` with a default
  ``ObjectiveConfig``: Diff-Tuning's ``power_up`` target schedule, the 0.1 guidance drop of the prompt
  to the empty prompt's embedding, epsilon MSE), ``draw``, ``backbone.drop``, the forward pass,
  ``reduce``, backward, ``AdamW.step()`` (``TrainConfig`` defaults, the parameters of
  ``apply_tuning(loaded, "full")``) and ``zero_grad``, on one shared model and optimiser.

What the step leaves out, the same in both modes: accelerate's wrapper, the EMA update
(``train.ema_decay``), logging and checkpoints; and the knowledge bank: every row of the batch is a
target row (``n_bank = 0``). With the default ``bank_share = 0.2`` a trainer's batch has 20% bank rows,
which are stored latents either way, so only 80% of the rows would need encoding.

Timing: after ``--warmup`` discarded steps of each mode, ``--repeats`` repetitions of ``--steps``
steps per mode, interleaved in alternating order (cached, uncached, uncached, cached, ...); a
repetition's figure is its mean step time, the reported figure the median over repetitions. Each
step's phases are timed on their own (load, vae, text, data, step; CUDA synchronised at every phase
boundary), on the wall clock and on process CPU time; as in ``step_time.py`` a one-thread CPU run
reports CPU time (``--clock auto``), with the wall clock beside it.

Printed: device, threads, torch / diffusers / transformers versions, the model sizes, a table (median
ms/step and IQR per mode, the phases), the per-repeat ratios, the share of the uncached step spent
encoding (load + vae + text, measured inside the step) and the share saved by the cache (1 - cached /
uncached), and on the LAST line ``ratio <value>`` = median uncached step / median cached step.
``--json OUT`` writes the same figures.

Usage (from the repository root, with the project's venv active)::

    python benchmarks/sd_cache_bench.py                       # small pipeline on the CPU, about 30 s on 2 cores
    python benchmarks/sd_cache_bench.py --size tiny --repeats 15
    python benchmarks/sd_cache_bench.py --device cuda --batch-size 32 --json sd_cache.json

Options: ``--size {tiny,small}``, ``--device {cpu,cuda}``, ``--batch-size``, ``--repeats``, ``--steps``,
``--warmup``, ``--images`` (files in the captioned folder), ``--image-size`` (side of the PNG files;
default the model's resolution, the cheapest case for loading), ``--threads``, ``--clock``, ``--seed``,
``--json``, ``--keep``, ``--verbose``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).parent))
import step_time  # noqa: E402

if TYPE_CHECKING:
    import torch

    from difftune.backbones.conditioning import Conditioning
    from difftune.backbones.loading import LoadedModel
    from difftune.data.captions import CaptionedImages
    from difftune.data.targets import TargetData

MODES = ("cached", "uncached")
PHASES = ("load", "vae", "text", "data", "step")  # cached: data + step only
ENCODING = ("load", "vae", "text")
OBJECTIVE = (
    "build_objective(ObjectiveConfig()) as Trainer: diff_tuning, power_up target schedule, cfg_dropout 0.1, "
    "epsilon MSE; every row a target row (n_bank = 0)"
)
# "small": block_out_channels (64, 128, 256) with cross-attention, CLIP text encoder hidden 256 / 4 layers /
# 77 tokens, a 4-block VAE of 64-128 channels, 64x64 images -> 4x8x8 latents. "tiny": tiny_models' pipeline
# (32x32 images -> 4x4x4 latents, text width 32, 16 tokens).
SIZES = ("tiny", "small")
SMALL_TEXT = {"hidden": 256, "layers": 4, "heads": 4, "max_length": 77}
SMALL_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (64, 128, 256),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": SMALL_TEXT["hidden"],
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SMALL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (64, 128, 128, 128),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "sample_size": 64,
}
COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
THINGS = ("cat", "dog", "house", "tree", "car", "flower", "bird", "boat")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=SIZES, default="small", help="pipeline size (default %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step, equal for both modes")
    p.add_argument("--repeats", type=int, default=7, help="repetitions per mode (interleaved)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    p.add_argument("--warmup", type=int, default=2, help="discarded steps of each mode first")
    p.add_argument("--images", type=int, default=64, help="image files in the captioned folder")
    p.add_argument("--image-size", type=int, help="side of the PNG files (default: the model's resolution)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op CPU threads (default 1, as step_time.py; 0 = torch's default)",
    )
    p.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="clock of the reported figures (auto: cpu on a 1-thread CPU run, else wall)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    p.add_argument("--verbose", action="store_true", help="let library warnings and progress bars through")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.images < 1:
        p.error("--repeats, --steps, --batch-size and --images must be >= 1, --warmup >= 0")
    return args


# -- the pipeline and the data ----------------------------------------------------------------------


def save_small_pipeline(root: Path, seed: int) -> Path:
    """A random-init StableDiffusionPipeline of the ``small`` size, written to ``root``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftune.testing.models import tiny_text_encoder

    t = SMALL_TEXT
    # the character-level CLIP tokenizer of the tiny pipeline, padding to 77 tokens as SD's does
    _, tokenizer = tiny_text_encoder(max_length=t["max_length"], seed=seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=t["hidden"],
            intermediate_size=4 * t["hidden"],
            num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"],
            max_position_embeddings=t["max_length"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    StableDiffusionPipeline(
        vae=AutoencoderKL(**SMALL_VAE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SMALL_UNET),
        scheduler=DDPMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(root)
    return root


def build_pipeline(root: Path, size: str, seed: int) -> Path:
    from difftune.testing.models import save_sd_pipeline

    if size == "tiny":
        return save_sd_pipeline(root, seed=seed)
    return save_small_pipeline(root, seed)


def write_captioned_folder(root: Path, n: int, side: int, seed: int) -> Path:
    """``n`` RGB PNG files (smooth colour fields plus noise, ``side`` px) and their ``metadata.jsonl``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BILINEAR), float)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        name = f"{i:05d}.png"
        Image.fromarray(image).save(root / name)
        caption = f"a photo of a {COLOURS[i % len(COLOURS)]} {THINGS[(i // len(COLOURS)) % len(THINGS)]}, number {i}"
        rows.append(json.dumps({"file_name": name, "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


@dataclass
class Bench:
    """Everything both modes share: the model, its objective and optimiser, and both data paths."""

    loaded: LoadedModel
    objective: Any
    optimizer: torch.optim.Optimizer
    target: TargetData  # the cache, as prepare_target returns it to the Trainer
    images: CaptionedImages  # the same files, read afresh
    captions: list[str]
    resolution: int
    device: str
    batch_size: int
    description: dict[str, Any] = field(default_factory=dict)


def params_of(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def prepare(args: argparse.Namespace, work: Path) -> Bench:
    import torch

    from difftune.backbones.adapters import apply_tuning
    from difftune.backbones.loading import load_pretrained
    from difftune.config.data import DataConfig
    from difftune.config.experiment import ObjectiveConfig, TrainConfig
    from difftune.data.captions import caption_folder
    from difftune.data.targets import prepare_target
    from difftune.objectives import build_objective
    from difftune.process import build_process

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{Path(sys.argv[0]).name}: --device cuda but CUDA is not available")
    loaded = load_pretrained(str(build_pipeline(work / "pipeline", args.size, args.seed)))
    backbone, codec, prompts = loaded.backbone, loaded.codec, loaded.parts.prompts  # SD's text encoder
    assert prompts is not None and codec.vae is not None
    resolution = codec.image_size(backbone.sample_shape)
    folder = write_captioned_folder(work / "captioned", args.images, args.image_size or resolution, args.seed)
    data_cfg = DataConfig(source="captions", path=str(folder), cache_dir=str(work / "target_cache"))
    # as Trainer.__init__: the objective, then the target set encoded once into the cache
    objective = build_objective(ObjectiveConfig(), build_process(loaded.scheduler_config), backbone)
    trainable = apply_tuning(loaded, "full")
    target = prepare_target(data_cfg, loaded, work / "target_cache", device)
    images = caption_folder(data_cfg)
    backbone.to(device)
    codec.to(device)
    prompts.to(device)
    tc = TrainConfig()
    optimizer = torch.optim.AdamW(
        trainable,
        lr=tc.learning_rate,
        betas=(tc.adam_beta1, tc.adam_beta2),
        eps=tc.adam_eps,
        weight_decay=tc.weight_decay,
    )
    c, h, w = backbone.sample_shape
    side = args.image_size or resolution
    description = {
        "unet_params": params_of(backbone.inner),
        "unet_blocks": list(backbone.inner.config.block_out_channels),
        "vae_encoder_params": params_of(codec.vae.encoder) + params_of(codec.vae.quant_conv),
        "vae_blocks": list(codec.vae.config.block_out_channels),
        "text_encoder_params": params_of(prompts.text_encoder),
        "text_hidden": prompts.width,
        "text_layers": int(prompts.text_encoder.config.num_hidden_layers),
        "tokens": prompts.max_length,
        "image_size": resolution,
        "file_size": side,
        "latent_shape": [c, h, w],
        "images": args.images,
    }
    assert len(target) == len(images), "the cache and the folder list different images"
    return Bench(
        loaded,
        objective,
        optimizer,
        target,
        images,
        images.captions,  # in the cache's order: both follow metadata.jsonl
        resolution,
        device,
        args.batch_size,
        description,
    )


# -- one step ---------------------------------------------------------------------------------------


class Laps:
    """Per-phase (wall, CPU) seconds of one step; CUDA synchronised at each boundary."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds: dict[str, list[float]] = {}
        self._last = self._now()

    def _now(self) -> tuple[float, float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def lap(self, phase: str) -> None:
        now = self._now()
        wall, cpu = self.seconds.setdefault(phase, [0.0, 0.0])
        self.seconds[phase] = [wall + now[0] - self._last[0], cpu + now[1] - self._last[1]]
        self._last = now


def batch(bench: Bench, mode: str, idx: torch.Tensor, g: torch.Generator, laps: Laps) -> tuple[Any, Any]:
    """x0 (B, C, h, w) and the prompt condition of rows ``idx``, from the cache or from the files."""
    import torch

    from difftune.backbones.conditioning import Conditioning
    from difftune.backbones.stable_diffusion import PROMPTS

    if mode == "cached":  # RunParts.batch
        x0, cond = bench.target.draw(idx, g), bench.target.cond.select(idx)
        laps.lap("data")
        return x0, cond
    codec, prompts = bench.loaded.codec, bench.loaded.parts.prompts
    assert prompts is not None
    pixels = bench.images.images(idx, bench.resolution, 3)
    laps.lap("load")
    mean, std = codec.encode(pixels.to(bench.device))
    laps.lap("vae")
    embeds = prompts.encode([bench.captions[i] for i in idx.tolist()])
    laps.lap("text")
    mean, std = mean.cpu(), std.cpu()  # the cache's draw is on the CPU too (x0 moves in the step)
    x0 = mean + std * torch.randn(mean.shape, generator=g)
    cond: Conditioning = Conditioning({PROMPTS: embeds})
    laps.lap("data")
    return x0, cond


def train_step(bench: Bench, mode: str, step: int, stream: Any, seed: int) -> dict[str, list[float]]:
    """One full step of ``mode``: its batch, then as Trainer._train (one process, no accumulation)."""
    import torch

    from difftune.training.streams import step_generator

    laps = Laps(bench.device == "cuda")
    backbone, objective, device = bench.loaded.backbone, bench.objective, bench.device
    g = step_generator(seed, step)
    idx = stream.take(bench.batch_size)
    x0, cond = batch(bench, mode, idx, g, laps)
    n = x0.shape[0]
    draw = objective.draw(n, 0, tuple(x0.shape[1:]), g)
    cond = backbone.drop(cond, draw.drop)
    is_bank = torch.zeros(n, dtype=torch.bool)
    terms = objective(backbone, x0.to(device), cond.to(device), is_bank.to(device), draw)
    loss = objective.reduce(terms, n, 0)
    loss.backward()
    bench.optimizer.step()
    bench.optimizer.zero_grad(set_to_none=True)
    laps.lap("step")
    return laps.seconds


# -- the measurement --------------------------------------------------------------------------------


def run_steps(
    bench: Bench,
    mode: str,
    n: int,
    counter: dict[str, int],
    args: argparse.Namespace,
    streams: dict[str, Any],
) -> dict[str, list[float]]:
    """Mean per-step (wall, CPU) seconds of each phase, and ``"total"``, over ``n`` steps of ``mode``."""
    sums: dict[str, list[float]] = {}
    for _ in range(n):
        for phase, (wall, cpu) in train_step(bench, mode, counter[mode], streams[mode], args.seed).items():
            s = sums.setdefault(phase, [0.0, 0.0])
            s[0] += wall
            s[1] += cpu
        counter[mode] += 1
    out = {phase: [s[0] / n, s[1] / n] for phase, s in sums.items()}
    out["total"] = [sum(v[0] for v in out.values()), sum(v[1] for v in out.values())]
    return out


def measure(bench: Bench, args: argparse.Namespace) -> dict[str, list[dict[str, list[float]]]]:
    """Per-repetition phase times of each mode: warm-up first, then alternating-order repetitions."""
    from difftune.training.streams import IndexStream

    bench.loaded.backbone.train()
    streams = {mode: IndexStream(len(bench.target), args.seed) for mode in MODES}  # same rows in both
    counter = dict.fromkeys(MODES, 0)
    if args.warmup:
        for mode in MODES:
            run_steps(bench, mode, args.warmup, counter, args, streams)
    times: dict[str, list[dict[str, list[float]]]] = {mode: [] for mode in MODES}
    for r in range(args.repeats):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            times[mode].append(run_steps(bench, mode, args.steps, counter, args, streams))
    return times


# -- the report -------------------------------------------------------------------------------------


def summarise(times: dict[str, list[dict[str, list[float]]]], clock: str) -> dict[str, Any]:
    """Medians (ms) per mode and phase on ``clock``, the ratio and the shares."""
    k = step_time.CLOCKS.index(clock)
    other = 1 - k
    modes: dict[str, Any] = {}
    for mode in MODES:
        per_repeat = [1000 * rep["total"][k] for rep in times[mode]]
        phases = {
            phase: statistics.median(1000 * rep[phase][k] for rep in times[mode])
            for phase in PHASES
            if phase in times[mode][0]
        }
        modes[mode] = {
            "median_ms": statistics.median(per_repeat),
            "iqr_ms": step_time.iqr(per_repeat),
            "per_repeat_ms": per_repeat,
            "phases_ms": phases,
            "other_clock_median_ms": statistics.median(1000 * rep["total"][other] for rep in times[mode]),
        }
    cached, uncached = modes["cached"]["median_ms"], modes["uncached"]["median_ms"]
    per_repeat_ratio = [
        u / c
        for u, c in zip(modes["uncached"]["per_repeat_ms"], modes["cached"]["per_repeat_ms"], strict=True)
    ]
    encoding = statistics.median(sum(1000 * rep[phase][k] for phase in ENCODING) for rep in times["uncached"])
    return {
        "modes": modes,
        "ratio": uncached / cached,
        "per_repeat_ratios": per_repeat_ratio,
        "median_per_repeat_ratio": statistics.median(per_repeat_ratio),
        "other_clock_ratio": modes["uncached"]["other_clock_median_ms"]
        / modes["cached"]["other_clock_median_ms"],
        "encoding_ms": encoding,
        "encoding_share": encoding / uncached,
        "saved_share": 1 - cached / uncached,
    }


def versions() -> dict[str, str]:
    import platform

    import diffusers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def report(args: argparse.Namespace, bench: Bench, result: dict[str, Any]) -> None:
    d, v = bench.description, result["versions"]
    clock, threads = result["clock"], result["threads"]
    other = "wall" if clock == "cpu" else "cpu"
    cpu_threads = f" ({threads} thread{'s' if threads > 1 else ''})" if bench.device == "cpu" else ""
    print("difftune SD step time: cached latents + prompt embeddings vs encoding every step")
    print(
        f"device   {bench.device}{cpu_threads}; torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}"
    )
    print(
        f"model    {args.size}: UNet {tuple(d['unet_blocks'])} {d['unet_params'] / 1e6:.2f}M params on "
        f"{'x'.join(map(str, d['latent_shape']))} latents; VAE {tuple(d['vae_blocks'])} encoder "
        f"{d['vae_encoder_params'] / 1e6:.2f}M params, {d['image_size']} px images; CLIP text encoder "
        f"hidden {d['text_hidden']}, {d['text_layers']} layers, {d['tokens']} tokens, "
        f"{d['text_encoder_params'] / 1e6:.2f}M params"
    )
    print(
        f"data     {d['images']} PNG files of {d['file_size']} px with captions (metadata.jsonl); "
        f"batch {args.batch_size}"
    )
    print(f"step     forward + backward + AdamW step; objective {OBJECTIVE}")
    print(
        f"timing   {step_time.CLOCK_NAMES[clock]}; {args.warmup} warm-up steps per mode, then "
        f"{args.repeats} interleaved repetitions of {args.steps} steps per mode (mean per step; median over repetitions)"
    )
    print()
    header = f"{'mode':<10}{'ms/step':>10}{'IQR ms':>9}" + "".join(f"{p:>9}" for p in PHASES)
    print(header + "   per-repeat ms/step")
    for mode in MODES:
        m = result["modes"][mode]
        phases = "".join(f"{m['phases_ms'][p]:>9.2f}" if p in m["phases_ms"] else f"{'-':>9}" for p in PHASES)
        print(
            f"{mode:<10}{m['median_ms']:>10.2f}{m['iqr_ms']:>9.2f}{phases}   "
            + " ".join(f"{x:.1f}" for x in m["per_repeat_ms"])
        )
    print(
        "(phases: medians over repetitions; load = PNG files -> pixels, vae = LatentCodec.encode, "
        "text = PromptEncoder.encode, data = posterior draw and condition, step = objective + backward + AdamW)"
    )
    print()
    print("per-repeat ratios uncached/cached  " + " ".join(f"{x:.3f}" for x in result["per_repeat_ratios"]))
    print(
        f"encoding (load + vae + text) {result['encoding_ms']:.2f} ms = {100 * result['encoding_share']:.1f}% "
        f"of the uncached step; the cache saves {100 * result['saved_share']:.1f}% of it (1 - cached/uncached)"
    )
    print(
        f"{step_time.CLOCK_NAMES[other]} (cross-check): cached {result['modes']['cached']['other_clock_median_ms']:.2f}, "
        f"uncached {result['modes']['uncached']['other_clock_median_ms']:.2f} ms/step, ratio {result['other_clock_ratio']:.3f}"
    )
    if args.json is not None:
        print(f"json     {args.json}")
    print(f"wall time {result['wall_s']:.0f} s")
    print(f"ratio {result['ratio']:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    step_time.start(args)
    import torch

    wall = time.perf_counter()
    with step_time.scratch(args, "difftune-sd-cache-") as work:
        quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(io.StringIO())
        with quiet:  # the target encoder's progress bar passes disable= itself
            bench = prepare(args, work)
        times = measure(bench, args)
    clock = step_time.resolve_clock(args, bench.device)
    result = {
        "device": bench.device,
        "threads": torch.get_num_threads(),
        "clock": clock,
        "versions": versions(),
        "size": args.size,
        "model": bench.description,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "objective": OBJECTIVE,
        "command": "python benchmarks/sd_cache_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        **summarise(times, clock),
    }
    result["wall_s"] = time.perf_counter() - wall
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    report(args, bench, result)
    if not math.isfinite(result["ratio"]):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
