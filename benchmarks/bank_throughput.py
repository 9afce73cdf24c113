"""Knowledge-bank generation throughput: difftune's path against the authors' path, at equal FID.

Diff-Tuning replays a knowledge bank of samples of the frozen pre-trained model. The authors make it
with DDPM at 250 steps, decode each sample with the VAE and write one PNG per sample, which training
reads back (and, for a latent model, re-encodes). ``difftune bank`` (:func:`difftune.bank.generate_bank`)
samples with a fast solver (DPM-Solver++ by default), runs the guided and the unguided branch of
classifier-free guidance in one forward pass, and stores the samples as safetensors shards that
training reads as they are. This script measures what that buys on the digits demo, and how
``difftune bank`` scales from 1 to 2 processes.

The model is the demo's pre-trained source (``difftune demo``'s class-conditional DiT on digits 0-4,
8x8 pixels, DDPM noise schedule, 1.4M parameters), from the demo's cache
(:func:`difftune.demos.digits.pretrain_source` with the default :class:`DemoSettings`; it is
pre-trained first, for a few minutes, only when no cached one exists). ``--model`` takes any
class-conditional DiT directory instead (the test uses a tiny random one).

The two paths, each timed from the loaded model to the bank read back as training reads it:

* **authors** (implemented here from that description, not copied): diffusers' ``DDPMScheduler``
  built from the model's own schedule (linear betas, ``fixed_small`` variance, x0 clipped to [-1, 1]),
  ``--authors-steps`` (250) ancestral steps; at each step one forward pass for the conditional and one
  for the unconditional (null-label) branch, combined with the guidance scale of the bank config's
  defaults (:class:`BankConfig`, 1.5); the model's learned-variance channel is dropped (difftune
  trains it with no variational term, so DDPM takes its fixed variance). Then each sample is
  "decoded" and written: the model is pixel-space, so decoding is the conversion of [-1, 1] to a
  uint8 image (no VAE runs on either path), and each image is saved as a grey-scale PNG in a folder
  per class, as an ImageFolder. The bank is read back from the PNG files as training would (PIL,
  ``ToTensor``, normalised to [-1, 1]), in batches of ``--batch-size``.
* **difftune**: :func:`generate_bank` with the ``bank`` section's defaults (DPM-Solver++ 2nd order,
  25 steps, guidance 1.5, shards of 256, batches of 64), for each step count of ``--steps-sweep``
  (the default count is always included), written to fresh shards; then read back as training reads
  it: :func:`~difftune.bank.load_bank` with ``mapped=True`` and the rows taken batch by batch.
  ``--schedulers`` sweeps other ``bank.sampling.scheduler`` classes too (e.g. ``DDPMScheduler``:
  difftune's path with DDPM at fewer steps, its guidance branches batched and shards written).

Both paths use the same samples: sample i has seed ``seed + i`` (the same initial noise on both
paths, and on the authors' path the same per-sample generator for DDPM's added noise) and label
``i mod K``. images/s = ``--samples`` / (sampling + writing + reading back).

**Equal FID.** FID of each path's ``--samples`` images is computed with the demo's features (the
64-d penultimate layer of the digit classifier that :class:`DigitsEvaluator` trains,
``classifier_steps`` as the demo) against the real digits 0-4 (the source domain, the 901 images of
scikit-learn's digits 0-4; that classifier was trained on them among others, as in the demo's own
setting for source digits). The noise of the comparison is estimated by a paired bootstrap: the
sample indices are resampled with replacement ``--bootstrap`` times, the same indices for both paths
(the samples share seeds and labels), and σ is the standard deviation of FID(difftune) -
FID(authors) over the resamples. A difftune setting is "at equal FID" when its FID exceeds the
authors' by at most 2σ (a lower FID also counts). The headline ratio is images/s of the fastest such
setting over the authors' images/s; when no setting is within noise, the setting of the lowest FID is
taken and the line before the table's end says so. ``--authors-seed-sets 2`` also runs the authors' path on a
second, disjoint set of seeds (``seed + N ..``), compared with the first like a difftune row (it
should come out "within"): the gap between its two FIDs is a direct check of the bootstrap's σ.

**Scaling.** ``difftune bank`` (the command, a fresh process, model loading and start-up included)
makes a bank of ``--scaling-samples`` samples with its defaults, once as one plain process and once
as two processes (``torchrun --standalone --nproc_per_node 2`` with ``ACCELERATE_USE_CPU=1``, as
tests/test_training.py launches CPU runs; shard k goes to process k mod 2, so use at least two
shards' worth of samples), and for the launcher's own cost once through ``torchrun
--nproc_per_node 1``. Every process runs one torch thread (``OMP_NUM_THREADS=1``). Wall clock.
``ratio 2proc/1proc time`` = time(2 processes) / time(plain command); the target is <= 0.6. Two
processes reach it only with two free cores and enough samples to bury the start-up (the torch and
diffusers imports and the model's loading, 8-20 s on a busy machine), which every process pays and
which is not divided: on a 2-core machine where other work keeps one core busy, and at the demo's
500 samples, the ratio stays near 1. ``--skip-throughput --scaling-samples 2048`` times the scaling
alone on a larger bank. Each run's generation alone (``difftune bank``'s ``generated in`` time: from the
loaded model to the last shard, the slowest process's) is printed beside it, with its 2/1 ratio: what
the processes divide, without the start-up they each pay. Last, the machine's own ceiling: two
single-thread matmul loops run at once against one after the other (0.5 on two independent cores; a
virtual machine whose cores share a physical one, or its memory bandwidth, gives more).

Clock: on the CPU with one torch thread (``--threads 1``, the default) the throughput figures are
process CPU time (``--clock auto``; user + system, so the PNG and shard writes' system calls count),
which does not count the time the process waits for a core while other work runs; the wall clock is
printed beside it. The wall clock includes the fsync of each shard that difftune's atomic writes do
and that the PNG path does not.

Printed: the settings, a table with one row per path/setting (steps, seconds sampling, writing,
reading back, images/s, FID, FID - FID(authors) and its σ, within noise or not), the scaling table,
and on the last two lines::

    ratio difftune/authors images_per_s <r> at FID <difftune's> vs <authors'>
    ratio 2proc/1proc time <s>

(``nan`` for a part skipped with ``--skip-scaling`` / ``--skip-throughput``). ``--json OUT`` writes
everything.

Reading it: on this 8x8 pixel model nearly all the time is the denoiser's forward passes; writing
and reading the PNG files costs well under 1% (no VAE to run), so the ratio is about the ratio of
steps. Running both guidance branches as one batch does not make a CPU step cheaper (a forward pass
of 128 rows costs about as much as two of 64). The FID columns say whether fewer steps of a given
sampler keep the authors' quality; ``--schedulers DPMSolverMultistepScheduler,DDPMScheduler`` puts
difftune's default solver beside stochastic DDPM at fewer steps.

Usage (from the repository root, with the project's venv active)::

    python benchmarks/bank_throughput.py                 # 500 samples: 5-10 min on the busy 2-core CPU
    python benchmarks/bank_throughput.py --skip-scaling  # 5-8 min
    # + DDPM through difftune's path and the direct noise check: 8-13 min
    python benchmarks/bank_throughput.py --schedulers DPMSolverMultistepScheduler,DDPMScheduler --authors-seed-sets 2
    python benchmarks/bank_throughput.py --skip-throughput --scaling-samples 2048   # scaling alone: 3 min

Options: ``--samples``, ``--steps-sweep`` (comma-separated), ``--schedulers``, ``--scheduler-option KEY=VALUE``
(repeatable: ``bank.sampling.scheduler_options`` of every difftune path), ``--authors-steps``,
``--authors-seed-sets {1,2}``, ``--bootstrap``, ``--batch-size``, ``--model`` / ``--subfolder``,
``--classifier-steps``, ``--skip-scaling``, ``--skip-throughput``, ``--scaling-samples``,
``--threads``, ``--clock``, ``--device``, ``--seed``, ``--json``, ``--keep``, ``--verbose``. Run time is about linear in
``--samples``; the authors' 250-step path is most of it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from difftune.backbones.loading import LoadedModel


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from difftune.config.sampling import parse_scheduler_option

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", type=int, default=500, help="bank samples per path (default %(default)s)")
    p.add_argument(
        "--steps-sweep",
        default="10,15,25,50",
        help="difftune step counts, comma-separated; the bank default is always added (default %(default)s)",
    )
    p.add_argument(
        "--schedulers",
        help="difftune samplers to sweep, comma-separated diffusers class names (bank.sampling.scheduler; "
        "default: the bank's default only)",
    )
    p.add_argument(
        "--scheduler-option",
        action="append",
        type=parse_scheduler_option,
        metavar="KEY=VALUE",
        help="a constructor argument of every difftune sampler (bank.sampling.scheduler_options; repeatable), "
        "e.g. algorithm_type=sde-dpmsolver++",
    )
    p.add_argument("--authors-steps", type=int, default=250, help="DDPM steps of the authors' path")
    p.add_argument(
        "--authors-seed-sets",
        type=int,
        choices=[1, 2],
        default=1,
        help="2: also run the authors' path on a second set of seeds (a direct check of the FID noise)",
    )
    p.add_argument("--bootstrap", type=int, default=200, help="paired bootstrap resamples for the FID noise")
    p.add_argument("--batch-size", type=int, help="sampling batch on both paths (default: bank.batch_size)")
    p.add_argument(
        "--model", help="class-conditional DiT directory (default: the demo's cached source model)"
    )
    p.add_argument("--subfolder", help="its denoiser's subfolder (default: ema/transformer for the demo's)")
    p.add_argument(
        "--classifier-steps",
        type=int,
        help="training steps of the FID digit classifier (default: the demo's)",
    )
    p.add_argument("--skip-scaling", action="store_true", help="do not time the 1- vs 2-process command")
    p.add_argument(
        "--skip-throughput", action="store_true", help="only the scaling runs (no sampling paths, no FID)"
    )
    p.add_argument("--scaling-samples", type=int, help="samples of the scaling runs (default --samples)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default %(default)s")
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op CPU threads (default 1; 0 = torch's default)"
    )
    p.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="clock of the throughput figures (auto: cpu on a 1-thread CPU run, else wall)",
    )
    p.add_argument("--seed", type=int, default=0, help="sample i has seed seed + i (default 0)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    p.add_argument("--verbose", action="store_true", help="let library warnings and progress bars through")
    args = p.parse_args(argv)
    try:
        args.sweep = sorted({int(s) for s in args.steps_sweep.split(",") if s.strip()})
    except ValueError:
        p.error(f"--steps-sweep {args.steps_sweep!r}: give step counts such as 10,15,25,50")
    if args.samples < 2 or args.authors_steps < 1 or args.bootstrap < 2 or min(args.sweep, default=0) < 1:
        p.error("--samples and --bootstrap must be >= 2, --authors-steps and every swept step count >= 1")
    if args.scaling_samples is not None and args.scaling_samples < 1:
        p.error("--scaling-samples must be >= 1")
    return args


# -- timing ---------------------------------------------------------------------------------------


@dataclass
class Span:
    """Seconds of one phase on both clocks."""

    cpu: float = 0.0
    wall: float = 0.0

    def of(self, clock: str) -> float:
        return self.cpu if clock == "cpu" else self.wall

    def __add__(self, other: Span) -> Span:
        return Span(self.cpu + other.cpu, self.wall + other.wall)


@contextlib.contextmanager
def timed(device: str) -> Iterator[Span]:
    """Time the block: process CPU time and wall clock (CUDA synchronised on both ends)."""
    import torch

    span = Span()
    if device == "cuda":
        torch.cuda.synchronize()
    cpu, wall = time.process_time(), time.perf_counter()
    yield span
    if device == "cuda":
        torch.cuda.synchronize()
    span.cpu, span.wall = time.process_time() - cpu, time.perf_counter() - wall


@dataclass
class PathRun:
    """One bank generation: its phases, images (in [0, 1], for FID) and scores."""

    name: str
    steps: int
    phases: dict[str, Span]
    images: torch.Tensor
    features: np.ndarray | None = None
    fid: float = math.nan
    delta: float = math.nan  # FID - FID(authors)
    sigma: float = math.nan  # bootstrap std of delta
    within: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def total(self) -> Span:
        out = Span()
        for span in self.phases.values():
            out = out + span
        return out

    def images_per_s(self, clock: str) -> float:
        seconds = self.total().of(clock)
        return self.images.shape[0] / seconds if seconds > 0 else math.nan


# -- the authors' path ----------------------------------------------------------------------------


@dataclass
class Source:
    """The model both paths sample: difftune's loaded form and the raw diffusers pieces."""

    path: str
    subfolder: str | None
    loaded: LoadedModel
    dit: Any  # diffusers DiTTransformer2DModel
    scheduler_config: dict[str, Any]
    num_classes: int
    description: str


def load_source(args: argparse.Namespace) -> Source:
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    from difftune.backbones import load_pretrained

    if args.model is None:
        from difftune.demos.digits import pretrain_source
        from difftune.demos.settings import DemoSettings

        settings = DemoSettings()
        path, subfolder = str(pretrain_source(settings)), args.subfolder or f"ema/{settings.model_folder}"
    else:
        path, subfolder = args.model, args.subfolder
    loaded = load_pretrained(path, subfolder=subfolder)
    dit = DiTTransformer2DModel.from_pretrained(path, subfolder=subfolder or "transformer").eval()
    scheduler_config = dict(DDPMScheduler.load_config(path, subfolder="scheduler"))
    params = sum(p.numel() for p in dit.parameters())
    cfg = dit.config
    description = (
        f"{path} [{subfolder or 'transformer'}]: DiT {cfg.num_attention_heads} heads x {cfg.attention_head_dim}, "
        f"{cfg.num_layers} layers, {cfg.in_channels}x{cfg.sample_size}x{cfg.sample_size} pixels, "
        f"{cfg.num_embeds_ada_norm} classes, {params / 1e6:.2f}M parameters"
    )
    return Source(path, subfolder, loaded, dit, scheduler_config, int(cfg.num_embeds_ada_norm), description)


@dataclass
class Plan:
    samples: int
    batch_size: int
    guidance: float
    seed: int
    device: str
    scheduler_options: dict[str, Any] = field(default_factory=dict)  # bank.sampling.scheduler_options


def labels_of(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    return indices % num_classes


def authors_sample(source: Source, indices: torch.Tensor, plan: Plan, steps: int, seed: int) -> torch.Tensor:
    """DDPM ancestral sampling with classifier-free guidance, two forward passes per step."""
    import torch
    from diffusers import DDPMScheduler

    dit = source.dit.to(plan.device)
    scheduler = DDPMScheduler.from_config(source.scheduler_config)
    scheduler.set_timesteps(steps, device=plan.device)
    channels, size = dit.config.in_channels, dit.config.sample_size
    generators = [torch.Generator().manual_seed(seed + int(i)) for i in indices]
    x = torch.stack([torch.randn((channels, size, size), generator=g) for g in generators]).to(plan.device)
    labels = labels_of(indices, source.num_classes).to(plan.device)
    null = torch.full_like(labels, source.num_classes)  # the null row of DiT's label table
    with torch.no_grad():
        for t in scheduler.timesteps:
            tt = t.reshape(1).expand(x.shape[0])
            eps_cond = dit(x, timestep=tt, class_labels=labels).sample[:, :channels]
            eps_uncond = dit(x, timestep=tt, class_labels=null).sample[:, :channels]
            eps = eps_uncond + plan.guidance * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x, generator=generators).prev_sample
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 (N, C, H, W): the pixel-space model's "decode"."""
    import torch

    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(device="cpu", dtype=torch.uint8)


def write_pngs(images: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor, root: Path) -> None:
    from PIL import Image

    for image, index, label in zip(images, indices.tolist(), labels.tolist(), strict=True):
        folder = root / f"{label:03d}"
        folder.mkdir(exist_ok=True)
        array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{index:06d}.png")


def read_pngs(root: Path, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The PNG bank as training reads an ImageFolder: files in order, ToTensor, normalised to [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    files = sorted((int(p.parent.name), p) for p in root.glob("*/*.png"))
    batches, labels = [], []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        arrays = []
        for _, path in chunk:
            with Image.open(path) as img:
                arrays.append(np.asarray(img.convert("L")))
        batch = torch.from_numpy(np.stack(arrays)).unsqueeze(1).float().div(255.0)
        batches.append(batch.sub(0.5).div(0.5))
        labels.extend(label for label, _ in chunk)
    order = torch.tensor([int(p.stem) for _, p in files]).argsort()  # back into sample order for FID
    return torch.cat(batches)[order], torch.tensor(labels)[order]


def run_authors(source: Source, plan: Plan, steps: int, seed: int, root: Path) -> PathRun:
    import torch

    root.mkdir(parents=True)
    phases = {"sample": Span(), "write": Span(), "read": Span()}
    for chunk in torch.arange(plan.samples).split(plan.batch_size):
        with timed(plan.device) as span:
            x = authors_sample(source, chunk, plan, steps, seed)
        phases["sample"] = phases["sample"] + span
        with timed(plan.device) as span:
            write_pngs(to_uint8(x), chunk, labels_of(chunk, source.num_classes), root)
        phases["write"] = phases["write"] + span
    with timed(plan.device) as span:
        pixels, labels = read_pngs(root, plan.batch_size)
    phases["read"] = span
    expected = labels_of(torch.arange(plan.samples), source.num_classes)
    assert torch.equal(labels, expected), "the PNG bank's labels are not i mod K"
    name = "authors" if seed == plan.seed else "authors (2nd seeds)"
    return PathRun(name, steps, phases, ((pixels + 1) / 2).clamp(0, 1), extra={"seed": seed})


# -- difftune's path ------------------------------------------------------------------------------


def run_difftune(source: Source, plan: Plan, scheduler: str, steps: int, root: Path) -> PathRun:
    import torch

    from difftune.bank import generate_bank, load_bank
    from difftune.config.experiment import BankConfig
    from difftune.config.sampling import SamplingSpec

    defaults = BankConfig()
    cfg = BankConfig(
        path=str(root),
        num_samples=plan.samples,
        batch_size=plan.batch_size,
        sampling=SamplingSpec(
            scheduler=scheduler,
            steps=steps,
            guidance_scale=defaults.sampling.guidance_scale,
            seed=plan.seed,
            scheduler_options=plan.scheduler_options,
        ),
    )
    with timed(plan.device) as generate:
        generate_bank(source.loaded, cfg, device=plan.device, progress=False)
    with timed(plan.device) as read:
        bank = load_bank(root, source.loaded, mapped=True)
        rows = [bank["samples"][chunk] for chunk in torch.arange(plan.samples).split(plan.batch_size)]
        samples = torch.cat(rows)
    expected = labels_of(torch.arange(plan.samples), source.num_classes)
    assert torch.equal(bank["labels"].long(), expected), "the bank's labels are not i mod K"
    phases = {"sample+write": generate, "read": read}
    short = "" if scheduler == defaults.sampling.scheduler else " " + scheduler.removesuffix("Scheduler")[:14]
    short += " +options" if plan.scheduler_options else ""
    extra = {"sampler": scheduler, "scheduler_options": plan.scheduler_options}
    return PathRun("difftune" + short, steps, phases, ((samples + 1) / 2).clamp(0, 1), extra=extra)


# -- FID and its noise ----------------------------------------------------------------------------


@dataclass
class Scorer:
    extractor: Any
    reference: Any  # FeatureStats of the real digits 0-4
    classifier_steps: int
    reference_count: int


def build_scorer(args: argparse.Namespace, num_classes: int) -> Scorer:
    from difftune.data.targets import load_digits_split
    from difftune.demos.evaluation import DigitsEvaluator
    from difftune.demos.settings import DemoSettings
    from difftune.metrics import compute_feature_stats

    settings = DemoSettings()
    if args.classifier_steps is not None:
        settings.classifier_steps = args.classifier_steps
    evaluator = DigitsEvaluator.build(settings)  # the demo's digit classifier and its features
    source_classes = settings.source_classes[:num_classes]
    images, _ = load_digits_split(source_classes)
    reference = compute_feature_stats((images + 1) / 2, evaluator.extractor)
    return Scorer(evaluator.extractor, reference, settings.classifier_steps, images.shape[0])


def score(scorer: Scorer, run: PathRun) -> None:
    import torch

    from difftune.metrics import compute_feature_stats, fid_from_stats

    run.fid = fid_from_stats(scorer.reference, compute_feature_stats(run.images, scorer.extractor))
    with torch.no_grad():
        run.features = scorer.extractor(run.images).double().numpy()


def bootstrap_fids(scorer: Scorer, features: np.ndarray, draws: np.ndarray) -> np.ndarray:
    import numpy as np

    from difftune.metrics.fid import frechet_distance

    ref = scorer.reference
    out = []
    for idx in draws:
        f = features[idx]
        out.append(frechet_distance(f.mean(0), np.cov(f, rowvar=False), ref.mu, ref.sigma))
    return np.array(out)


def compare(scorer: Scorer, authors: PathRun, runs: list[PathRun], draws: np.ndarray) -> None:
    """Each run's FID gap to the authors' and that gap's paired-bootstrap σ; within = gap <= 2σ."""
    base = bootstrap_fids(scorer, authors.features, draws)
    authors.sigma = float(base.std(ddof=1))
    for run in runs:
        gaps = bootstrap_fids(scorer, run.features, draws) - base
        run.delta, run.sigma = run.fid - authors.fid, float(gaps.std(ddof=1))
        run.within = run.delta <= 2 * run.sigma


# -- scaling of the command -----------------------------------------------------------------------


def write_bank_config(path: Path, source: Source, bank: Path, samples: int) -> None:
    lines = [
        "model:",
        f"  pretrained: {json.dumps(source.path)}",
        *([f"  subfolder: {json.dumps(source.subfolder)}"] if source.subfolder else []),
        "data:",  # the config needs a target; the bank does not read it
        "  source: digits",
        "bank:",
        f"  path: {json.dumps(str(bank))}",
        f"  num_samples: {samples}",
    ]
    path.write_text("\n".join(lines) + "\n")


def generation_seconds(output: str) -> float:
    """The longest ``generated in <s> s`` of the ``bank complete`` lines (one per process) in ``output``."""
    found = [float(m) for m in re.findall(r"generated in ([0-9.]+) s\)", output)]
    if not found:
        raise RuntimeError(f"no 'generated in' line in the command's output:\n{output[-2000:]}")
    return max(found)


def time_command(cmd: list[str], cwd: Path, timeout: int = 1800) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "TQDM_DISABLE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return seconds, generation_seconds(proc.stdout)


MATMUL_LOOP = (
    "import time, torch\n"
    "torch.set_num_threads(1)\n"
    "a, b = torch.randn(512, 512), torch.randn(512, 512)\n"
    "start = time.perf_counter()\n"
    "for _ in range(1500):\n"
    "    a @ b\n"
    "print(time.perf_counter() - start)\n"
)


def machine_ceiling(repeats: int = 3) -> float:
    """What this machine allows two processes: the wall time of two single-thread matmul loops run at once
    over that of the two run one after the other (0.5: two independent cores), the median of ``repeats``."""
    cmd = [sys.executable, "-c", MATMUL_LOOP]
    ratios = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(2):
            subprocess.run(cmd, check=True, capture_output=True)
        serial = time.perf_counter() - start
        start = time.perf_counter()
        running = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL) for _ in range(2)]
        for proc in running:
            proc.wait()
        ratios.append((time.perf_counter() - start) / serial)
    return sorted(ratios)[len(ratios) // 2]


def scaling(source: Source, samples: int, work: Path) -> dict[str, Any]:
    """Wall seconds of ``difftune bank`` as one plain process, through torchrun with 1 and with 2 processes."""
    from difftune.testing.processes import torchrun_command

    launchers = {
        "1 process (difftune bank)": [sys.executable, "-m", "difftune", "bank"],
        "1 process (torchrun)": torchrun_command("-m", "difftune", "bank", processes=1),
        "2 processes (torchrun)": torchrun_command("-m", "difftune", "bank", processes=2),
    }
    seconds, generating = {}, {}
    for i, (name, launcher) in enumerate(launchers.items()):
        config = work / f"scaling-{i}.yaml"
        bank = work / f"scaling-bank-{i}"
        write_bank_config(config, source, bank, samples)
        seconds[name], generating[name] = time_command([*launcher, "--config", str(config)], cwd=work)
        manifest = json.loads((bank / "manifest.json").read_text())
        assert manifest["num_samples"] == samples
    one, two = seconds["1 process (difftune bank)"], seconds["2 processes (torchrun)"]
    return {
        "samples": samples,
        "shards": -(-samples // 256),
        "seconds": seconds,
        "generation_seconds": generating,
        "ratio": two / one,
        "ratio_vs_torchrun_1": two / seconds["1 process (torchrun)"],
        "generation_ratio": generating["2 processes (torchrun)"] / generating["1 process (difftune bank)"],
        "machine_ceiling": machine_ceiling(),
    }


# -- the whole measurement ------------------------------------------------------------------------


def quiet_environment(args: argparse.Namespace) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads or os.cpu_count() or 1))
    if args.verbose:
        return
    os.environ["TQDM_DISABLE"] = "1"
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def versions() -> dict[str, str]:
    import platform

    import diffusers
    import torch

    import difftune

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "difftune": getattr(difftune, "__version__", "?"),
    }


def choose(runs: list[PathRun], clock: str) -> tuple[PathRun, bool]:
    """The fastest difftune setting within noise of the authors' FID; else the one of lowest FID."""
    within = [r for r in runs if r.within]
    if within:
        return max(within, key=lambda r: r.images_per_s(clock)), True
    return min(runs, key=lambda r: r.fid), False


def row(run: PathRun, clock: str) -> dict[str, Any]:
    return {
        "path": run.name,
        "steps": run.steps,
        "phases_s": {k: {"cpu": v.cpu, "wall": v.wall} for k, v in run.phases.items()},
        "total_s": {"cpu": run.total().cpu, "wall": run.total().wall},
        "images_per_s": run.images_per_s(clock),
        "images_per_s_other_clock": run.images_per_s("wall" if clock == "cpu" else "cpu"),
        "fid": run.fid,
        "fid_minus_authors": run.delta,
        "sigma": run.sigma,
        "within_noise": run.within,
        **run.extra,
    }


def throughput(args: argparse.Namespace, source: Source, work: Path, clock: str) -> dict[str, Any]:
    """Both paths, the difftune sweep, their FIDs and the headline; the JSON's throughput fields."""
    import numpy as np

    from difftune.config.experiment import BankConfig

    defaults = BankConfig()
    sweep = sorted({*args.sweep, defaults.sampling.steps})
    schedulers = args.schedulers.split(",") if args.schedulers else [defaults.sampling.scheduler]
    quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        scorer = build_scorer(args, source.num_classes)
    plan = Plan(
        samples=args.samples,
        batch_size=args.batch_size or defaults.batch_size,
        guidance=defaults.sampling.guidance_scale,
        seed=args.seed,
        device=args.device,
        scheduler_options=dict(args.scheduler_option or ()),
    )
    with quiet:  # warm-up: the first forward passes of each path pay one-time costs
        warm = Plan(2, 2, plan.guidance, plan.seed, plan.device, plan.scheduler_options)
        run_authors(source, warm, 2, plan.seed, work / "warm-authors")
        for i, scheduler in enumerate(schedulers):
            run_difftune(source, warm, scheduler, 2, work / f"warm-difftune-{i}")
    authors = run_authors(source, plan, args.authors_steps, plan.seed, work / "authors")
    second = None
    if args.authors_seed_sets == 2:
        second = run_authors(source, plan, args.authors_steps, plan.seed + plan.samples, work / "authors-2")
    runs = []
    for i, scheduler in enumerate(schedulers):
        for steps in sweep:
            with quiet:
                runs.append(run_difftune(source, plan, scheduler, steps, work / f"difftune-{i}-{steps}"))
    checks = [second] if second is not None else []
    for run in [authors, *runs, *checks]:
        score(scorer, run)
    draws = np.random.default_rng(args.seed).integers(0, plan.samples, (args.bootstrap, plan.samples))
    compare(scorer, authors, [*runs, *checks], draws)

    other = "wall" if clock == "cpu" else "cpu"
    best, within = choose(runs, clock)
    result: dict[str, Any] = {
        "samples": plan.samples,
        "batch_size": plan.batch_size,
        "guidance_scale": plan.guidance,
        "seed": plan.seed,
        "num_classes": source.num_classes,
        "classifier_steps": scorer.classifier_steps,
        "reference": f"0-{source.num_classes - 1}",
        "reference_count": scorer.reference_count,
        "bootstrap": args.bootstrap,
        "authors_sampler": f"DDPMScheduler, {args.authors_steps} steps, two forward passes per step",
        "difftune_samplers": schedulers,
        "difftune_scheduler_options": plan.scheduler_options,
        "difftune_default": f"{defaults.sampling.scheduler}, {defaults.sampling.steps} steps",
        "runs": [row(r, clock) for r in [authors, *runs, *checks]],
        "headline": {
            "path": best.name,
            "steps": best.steps,
            "within_noise": within,
            "images_per_s": best.images_per_s(clock),
            "authors_images_per_s": authors.images_per_s(clock),
            "ratio": best.images_per_s(clock) / authors.images_per_s(clock),
            "ratio_other_clock": best.images_per_s(other) / authors.images_per_s(other),
            "sampling_ratio": authors.phases["sample"].of(clock) / best.phases["sample+write"].of(clock),
            "fid": best.fid,
            "authors_fid": authors.fid,
        },
    }
    if second is not None:
        result["authors_second_seeds"] = {
            "fid": second.fid,
            "first_fid": authors.fid,
            "gap": abs(second.fid - authors.fid),
            "expected_gap_scale": math.sqrt(2) * authors.sigma,
        }
    return result


def report_throughput(result: dict[str, Any]) -> None:
    clock, other = result["clock"], "wall" if result["clock"] == "cpu" else "cpu"
    print(
        f"samples  {result['samples']} per path, batch {result['batch_size']}, guidance {result['guidance_scale']:g}, "
        f"seeds {result['seed']}.., labels i mod {result['num_classes']}"
    )
    print(
        f"authors  {result['authors_sampler']}, one PNG per sample; difftune default {result['difftune_default']}"
    )
    print(
        f"FID      digit-classifier features ({result['classifier_steps']} steps), reference real digits "
        f"{result['reference']} ({result['reference_count']} images); σ: paired bootstrap, {result['bootstrap']} draws"
    )
    print(f"clock    {clock} (process CPU time)" if clock == "cpu" else f"clock    {clock}")
    print()
    head = (
        f"{'path':<24}{'steps':>6}{'sample':>9}{'write':>8}{'read':>7}{'total':>8}{'img/s':>9}{f'({other})':>9}"
        f"{'FID':>8}{'-auth':>8}{'2σ':>7}  within"
    )
    print(head)
    print("-" * len(head))
    for r in result["runs"]:
        ph = r["phases_s"]
        joint = "sample+write" in ph  # difftune's shards are written inside generate_bank
        sample = ph["sample+write" if joint else "sample"][clock]
        write = f"{'incl.':>8}" if joint else f"{ph['write'][clock]:>8.2f}"
        first = r["path"] == "authors"
        gap = f"{'':>8}" if first else f"{r['fid_minus_authors']:>+8.2f}"
        within = "" if first else ("yes" if r["within_noise"] else "no")
        print(
            f"{r['path']:<24}{r['steps']:>6}{sample:>9.2f}{write}{ph['read'][clock]:>7.2f}{r['total_s'][clock]:>8.2f}"
            f"{r['images_per_s']:>9.1f}{r['images_per_s_other_clock']:>9.1f}{r['fid']:>8.2f}{gap}"
            f"{2 * r['sigma']:>7.2f}  {within}"
        )
    print(
        "(seconds; difftune's sample column includes writing its shards; 2σ: for the authors' row twice its"
    )
    print(" own bootstrap σ, for the others twice the σ of their FID gap to it; within: gap <= 2σ)")
    h = result["headline"]
    how = "the fastest within noise" if h["within_noise"] else "none within noise: the lowest FID"
    print()
    print(
        f"{h['path']} at {h['steps']} steps ({how}): {h['images_per_s']:.1f} images/s vs authors "
        f"{h['authors_images_per_s']:.1f} (sampling alone x{h['sampling_ratio']:.2f}; {other} clock "
        f"x{h['ratio_other_clock']:.2f})"
    )
    if "authors_second_seeds" in result:
        s = result["authors_second_seeds"]
        print(
            f"authors' FID on a second seed set: {s['fid']:.2f} vs {s['first_fid']:.2f} (gap {s['gap']:.2f}; "
            f"√2 σ_authors = {s['expected_gap_scale']:.2f})"
        )


def report(result: dict[str, Any]) -> None:
    v = result["versions"]
    print("difftune knowledge-bank throughput: difftune bank vs the authors' DDPM-250 + PNG path")
    print(
        f"device   {result['device']} ({result['threads']} thread(s)); python {v['python']}, torch {v['torch']}, "
        f"diffusers {v['diffusers']}"
    )
    print(f"model    {result['model']}")
    if "headline" in result:
        report_throughput(result)
    sc = result.get("scaling")
    if sc:
        print()
        print(
            f"scaling: `difftune bank` on {sc['samples']} samples ({sc['shards']} shards), wall clock, "
            "1 torch thread per process"
        )
        for name, seconds in sc["seconds"].items():
            print(f"  {name:<28}{seconds:>8.1f} s   (generating {sc['generation_seconds'][name]:.1f} s)")
        print(f"  2 processes / torchrun 1 process: {sc['ratio_vs_torchrun_1']:.3f}")
        g = sc["generation_seconds"]
        print(
            f"  generation alone, 2 processes / 1 process: {sc['generation_ratio']:.3f} "
            f"(/ torchrun's 1 process: {g['2 processes (torchrun)'] / g['1 process (torchrun)']:.3f})"
        )
        print(
            f"  the machine's own 2-process ratio (two matmul loops at once / one after the other): {sc['machine_ceiling']:.3f}"
        )
    h = result.get("headline")
    print()
    if h:
        print(
            f"ratio difftune/authors images_per_s {h['ratio']:.2f} at FID {h['fid']:.2f} vs {h['authors_fid']:.2f}"
        )
    else:
        print("ratio difftune/authors images_per_s nan at FID nan vs nan")
    print(f"ratio 2proc/1proc time {sc['ratio'] if sc else math.nan:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_environment(args)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")  # as the difftune CLI does
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall"

    wall = time.perf_counter()
    result: dict[str, Any] = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "clock": clock,
        "versions": versions(),
        "command": "python benchmarks/bank_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    work = Path(tempfile.mkdtemp(prefix="difftune-bank-throughput-"))
    try:
        with contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(io.StringIO()):
            source = load_source(args)
        result["model"] = source.description
        if not args.skip_throughput:
            result.update(throughput(args, source, work, clock))
        if not args.skip_scaling:
            result["scaling"] = scaling(source, args.scaling_samples or args.samples, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - wall
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    return 0 if all(math.isfinite(r["fid"]) for r in result.get("runs", [])) else 1


if __name__ == "__main__":
    raise SystemExit(main())
