"""difftune's training step against diffusers' ``train_text_to_image.py`` / ``train_controlnet.py``, side by side.

diffusers' example scripts are the usual way to fine-tune Stable Diffusion or to train a ControlNet on
it. This script re-implements what their training loops do per step (from reading the scripts, not
their code) and times it beside difftune's real :class:`difftune.training.loop.Trainer`, in one
process, on the same random-init pipeline, the same captioned PNG folder, the same global batch and
the same device, in one of two modes (``--mode``):

* **peer**, ``text_to_image`` (``train_text_to_image.py --use_ema --center_crop --random_flip``):
  a shuffled ``DataLoader`` (``--workers`` processes, default 0, as the script's default) over the
  folder's ``metadata.jsonl``; every item is read from its PNG file and transformed on access (resize
  of the short side to the resolution with the script's default Lanczos filter, skipped when the size
  already matches as torchvision's ``Resize`` does; centre crop; random horizontal flip; to tensor;
  normalise to [-1, 1]) and its caption tokenised (CLIP tokenizer, padded to its maximum length);
  ``accelerate``'s ``Accelerator`` prepares the UNet, the optimiser, the loader and the (constant)
  learning-rate scheduler. Every step: ``vae.encode(pixels).latent_dist.sample() *
  scaling_factor``; the text encoder's forward on the token ids; Gaussian noise (noise offset off);
  ``t ~ U{0, ..., T-1}``; ``DDPMScheduler.add_noise``; the UNet's forward; epsilon MSE in fp32;
  ``accelerator.gather(loss.repeat(batch)).mean().item()`` (a host synchronisation every step),
  logged with ``accelerator.log`` to the scripts' default tracker (TensorBoard) every step;
  ``accelerator.backward``; ``clip_grad_norm_`` (max norm 1.0); ``AdamW(lr=1e-4,
  weight_decay=1e-2)``; ``lr_scheduler.step()``; ``zero_grad()``; and diffusers' ``EMAModel.step``
  of the UNet (decay 0.9999, the per-parameter loop: ``--foreach_ema`` off by default).
* **peer**, ``controlnet`` (``train_controlnet.py``): the same loader, plus each item's conditioning
  image (the Canny edges of the image, written as PNG files beside it and listed in
  ``metadata.jsonl``), read and transformed on access (bilinear resize, centre crop, to tensor in
  [0, 1]), the target image with bilinear resize, centre crop and no flip. Every step: the VAE and
  text encodes as above; noise and ``t``; the ControlNet (``ControlNetModel.from_unet``, trained)
  gives the residuals that the frozen UNet takes; epsilon MSE; ``loss.detach().item()`` for the
  progress bar's log (and the tracker's, as above); ``clip_grad_norm_`` of the ControlNet (1.0); ``AdamW(lr=5e-6,
  weight_decay=1e-2)`` over the ControlNet only; ``zero_grad(set_to_none=False)``; no EMA.
* **difftune**: the real ``Trainer.train()`` on the same folder (``data.source: captions``), which
  encodes every image once into a cache (``prepare_target``: VAE posterior mean and std, each step
  draws ``mean + std * noise``; the caption's prompt embeddings; ``text_to_image`` with
  ``data.hflip: true``, every image cached twice, once mirrored, for the peer's random flip;
  ``controlnet`` with ``data.annotator: canny``, the same edges computed once), and a knowledge bank
  of stored latents (``generate_bank`` from the captions, ``--bank-samples``), with the Diff-Tuning
  defaults (``power_up`` / ``power_down``, ``bank_share 0.2``, ``bank_weight 0.1``, ``cfg_dropout
  0.1``) and the ``train`` defaults (AdamW 1e-4, no gradient clipping, TensorBoard; one log, at the
  end: no per-step host synchronisation); ``text_to_image`` with the default EMA (0.9999), ``controlnet`` with
  ``model.controlnet: from_unet`` and ``train.ema_decay: 0`` (the recipe's and the peer's: no EMA).

Both paths run at the same global batch (``--batch-size``): the peer's rows are all target images,
difftune's are ``B - int(0.2 B)`` target and ``int(0.2 B)`` bank rows in one forward pass. Both run
in fp32 unless ``--mixed-precision bf16`` (both: difftune's ``train.mixed_precision``; the peer's
``Accelerator(mixed_precision=...)`` with the frozen VAE, text encoder and, for the ControlNet, UNet
cast to bf16, as the scripts' ``weight_dtype``). Not reproduced: the ``datasets`` library's Arrow
layer (the items are read from the PNG files directly), the progress bar, validation and
checkpoints (the difftune run's final checkpoint cancels in the timing).

Timing, as ``peer_dit.py`` (whose measurement this script runs, with its own loop): a path's per-step
time is ``(time of run(warmup + steps) - time of run(warmup)) / steps``, each run fresh (difftune: a
new ``Trainer``; peer: the models reloaded from the pipeline folder, a new ``Accelerator``,
optimiser, EMA and loader), so set-up, the first iteration and the final checkpoint cancel. One
discarded short run of each path first, then ``--repeats`` repeats in alternating order. The peer's
step is split into ``load`` (the loader's next batch: PNG decoding, transforms, tokenising, collation,
the copy to the device), ``encode`` (the VAE and text encoder forwards) and ``step`` (the rest); on a
GPU each phase boundary synchronises CUDA. A one-thread CPU run reports process CPU time (``--clock
auto``; the wall clock beside it), a GPU run the CUDA-synchronised wall clock.

Checked in every run: each path's losses are finite, and each run of each path changed the weights
it trains (the largest absolute change of any trainable weight from before the run to after it, is
printed; it must be positive). The copy is taken before the clock starts; the peer's comparison runs
at the end of its run, inside the clock, once per run (it cancels in the difference).

Printed: versions, model, batch, the table (median ms/step and IQR per path, the peer's phases),
per-repeat ratios, the other clock's ratio, losses and weight changes, the wall time and on the LAST
line ``ratio <value>`` = median difftune ms/step / median peer ms/step (below 1: difftune is faster).
``--json OUT`` writes the same figures.

Sizes (``--size``): ``tiny`` (the test suite's pipeline: UNet (16, 32) on 4x4x4 latents of 32-px
images, text width 32, 16 tokens); ``small`` (default: ``sd_cache_bench.py``'s UNet (64, 128, 256)
with cross-attention, 18.2M params, on 4x8x8 latents of 64-px images, a VAE of blocks (64, 128, 128,
128), a CLIP text encoder of hidden 256, 4 layers, 77 tokens); ``sd15`` (SD 1.5's UNet, the SD-VAE
and CLIP ViT-L/14's text encoder at 512 px with random weights, ``gpu_throughput.build_sd``: for a
GPU). Nothing is downloaded. The ``sd15`` size and ``--device cuda`` have NOT been run yet: this
script was written and measured in a session without a GPU (CPU figures in ``benchmarks/README.md``).

Usage (from the repository root, with the project's venv active)::

    python benchmarks/peer_sd.py                                   # small, text-to-image, one CPU thread
    python benchmarks/peer_sd.py --mode controlnet
    python benchmarks/peer_sd.py --size tiny --repeats 5
    python benchmarks/peer_sd.py --size sd15 --device cuda --mixed-precision bf16 --batch-size 32 \\
        --steps 20 --warmup 3 --repeats 3 --json peer_sd.json

Options: ``--mode {text_to_image,controlnet}``, ``--size {tiny,small,sd15}``, ``--device
{auto,cpu,cuda}``, ``--batch-size`` (default 10: 8 target + 2 bank rows for difftune, its 20%),
``--steps`` (5), ``--warmup`` (1), ``--repeats`` (5),
``--images`` (PNG files; default 4 x the batch), ``--image-size`` (side of the files; default the
model's resolution), ``--mixed-precision {no,bf16}``, ``--bank-samples`` (8), ``--bank-steps``,
``--workers``, ``--threads``, ``--clock``, ``--seed``, ``--json``, ``--keep``, ``--verbose``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput  # noqa: E402
import peer_dit  # noqa: E402
import real_size  # noqa: E402
import sd_cache_bench  # noqa: E402
import step_time  # noqa: E402

if TYPE_CHECKING:
    import torch

    from difftune.training.loop import Trainer

MODES = ("text_to_image", "controlnet")
SIZES = ("tiny", "small", "sd15")
PEER = "peer"
PHASES = ("load", "encode", "step")
BANK_SHARE = 0.2
CONTROL_COLUMN = "conditioning_image"  # train_controlnet.py's default column name


@dataclass(frozen=True)
class Script:
    """What a diffusers example does, where its two scripts differ (their defaults, and the flags named)."""

    name: str
    learning_rate: float
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    ema: bool = False
    random_flip: bool = False
    interpolation: str = "BILINEAR"  # PIL.Image.Resampling member
    gather_loss: bool = (
        False  # accelerator.gather(loss.repeat(batch)).mean().item(), else loss.detach().item()
    )
    set_grads_to_none: bool = True


SCRIPTS = {
    "text_to_image": Script(
        "train_text_to_image.py --use_ema --center_crop --random_flip",
        learning_rate=1e-4,
        ema=True,
        random_flip=True,
        interpolation="LANCZOS",
        gather_loss=True,
    ),
    "controlnet": Script("train_controlnet.py", learning_rate=5e-6, set_grads_to_none=False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        conflict_handler="resolve",  # this script's --size replaces step_time's
    )
    step_time.add_arguments(p, steps=5, repeats=5, batch_help="global batch, both paths")
    p.add_argument(
        "--mode", choices=MODES, default="text_to_image", help="which example (default %(default)s)"
    )
    p.add_argument("--size", choices=SIZES, default="small", help="pipeline size (default %(default)s)")
    p.set_defaults(warmup=1, bank_samples=8, batch_size=10)
    p.add_argument("--images", type=int, help="PNG files in the captioned folder (default: 4 x the batch)")
    p.add_argument("--image-size", type=int, help="side of the PNG files (default: the model's)")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no", help="both paths (default no)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes of the peer's loader")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results to this JSON file")
    args = step_time.check_args(p, p.parse_args(argv))
    if args.images is None:
        args.images = 4 * args.batch_size
    if (
        int(BANK_SHARE * args.batch_size) < 1
        or args.images < args.batch_size
        or args.images % args.batch_size
    ):
        p.error("--batch-size must be >= 5 (one bank row) and --images a multiple of it (full batches)")
    if args.bank_samples < int(BANK_SHARE * args.batch_size) or args.workers < 0:
        p.error("--bank-samples must be at least the bank share of the batch, --workers >= 0")
    return args


# -- the pipeline, the data and the bank ------------------------------------------------------------


@dataclass
class Bench:
    """What both paths share: the pipeline and its bank (``setup``), the folder, the mode."""

    setup: step_time.Setup
    folder: Path  # PNG files, metadata.jsonl (and the conditioning images)
    mode: str
    resolution: int
    run: step_time.Run  # difftune's
    description: dict[str, Any]
    losses: dict[str, list[float]] = field(default_factory=lambda: {"difftune": [], PEER: []})
    changes: dict[str, list[float]] = field(default_factory=lambda: {"difftune": [], PEER: []})
    logs: Path = Path()  # the peer's tracker folders
    runs: int = 0


def build_source(root: Path, size: str, seed: int, device: str) -> Path:
    """The random-init pipeline of ``size``, saved as a ``StableDiffusionPipeline`` folder."""
    if size == "sd15":
        return gpu_throughput.build_sd(root, "real", seed, device)[0]
    return sd_cache_bench.build_pipeline(root, size, seed)


def add_control_images(folder: Path) -> None:
    """Each image's Canny edges (as ``data.annotator: canny`` computes them) saved beside it and
    listed in ``metadata.jsonl``: the conditioning image column of train_controlnet.py's dataset."""
    meta = folder / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    (folder / "conditioning").mkdir()
    for row in rows:
        name = f"conditioning/{row['file_name']}"
        real_size.canny_control(folder / row["file_name"], folder / name)
        row[CONTROL_COLUMN] = name
    meta.write_text("".join(json.dumps(row) + "\n" for row in rows))


def difftune_run(mode: str, folder: Path, mixed_precision: str) -> step_time.Run:
    """The Trainer's run: Diff-Tuning and train defaults on the captioned folder (see the module docstring)."""
    data: dict[str, Any] = {"source": "captions", "path": str(folder), "classes": None}
    train: dict[str, Any] = {"mixed_precision": mixed_precision}
    model: dict[str, Any] = {}
    if mode == "controlnet":
        data["annotator"] = "canny"
        model["controlnet"] = "from_unet"
        train["ema_decay"] = 0.0
    else:
        data["hflip"] = True
    return step_time.Run(data=data, model=model, train=train)


def prepare(args: argparse.Namespace, work: Path) -> Bench:
    """The pipeline, the folder (and control images), the bank generated once from the captions."""
    import dataclasses

    import torch

    from difftune.backbones import load_pretrained
    from difftune.bank import generate_bank
    from difftune.bank.conditions import prepare_bank_conditions

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{Path(sys.argv[0]).name}: --device cuda but CUDA is not available")
    source = build_source(work / "pipeline", args.size, args.seed, device)
    models = load_models(source, args.mode)
    resolution = 8 * int(models["unet"].config.sample_size)
    side = args.image_size or resolution
    folder = sd_cache_bench.write_captioned_folder(work / "captioned", args.images, side, args.seed)
    if args.mode == "controlnet":
        add_control_images(folder)
    description = describe(models, resolution, side)
    del models
    run = difftune_run(args.mode, folder, args.mixed_precision)
    setup = step_time.Setup(source, work / "bank", work / "target_cache", "", device)
    cfg = step_time.make_config(setup, run, args, work / "bank-run", 1)
    loaded = load_pretrained(str(source), controlnet=run.model.get("controlnet"))
    prepare_bank_conditions(loaded, cfg)  # the captions as prompts; a ControlNet's annotator
    bank = dataclasses.replace(cfg.bank, batch_size=min(gpu_throughput.BANK_BATCH, args.bank_samples))
    generate_bank(loaded, bank, device=device, progress=args.verbose)
    del loaded
    return Bench(setup, folder, args.mode, resolution, run, description, logs=work / "peer-logs")


def load_models(source: Path, mode: str) -> dict[str, Any]:
    """The pipeline's parts as the example scripts load them (``from_pretrained`` of each sub-folder),
    and for ``controlnet`` a new ``ControlNetModel.from_unet``."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    models: dict[str, Any] = {
        "tokenizer": AutoTokenizer.from_pretrained(source / "tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(source / "text_encoder"),
        "vae": AutoencoderKL.from_pretrained(source / "vae"),
        "unet": UNet2DConditionModel.from_pretrained(source / "unet"),
        "scheduler": DDPMScheduler.from_pretrained(source / "scheduler"),
    }
    if mode == "controlnet":
        models["controlnet"] = ControlNetModel.from_unet(models["unet"])
    return models


def describe(models: dict[str, Any], resolution: int, side: int) -> dict[str, Any]:
    unet, vae, text = models["unet"], models["vae"], models["text_encoder"]
    out = {
        "unet_blocks": list(unet.config.block_out_channels),
        "unet_params": sd_cache_bench.params_of(unet),
        "latent_side": int(unet.config.sample_size),
        "vae_blocks": list(vae.config.block_out_channels),
        "vae_encoder_params": sd_cache_bench.params_of(vae.encoder)
        + sd_cache_bench.params_of(vae.quant_conv),
        "text_hidden": int(text.config.hidden_size),
        "text_layers": int(text.config.num_hidden_layers),
        "tokens": int(models["tokenizer"].model_max_length),
        "text_encoder_params": sd_cache_bench.params_of(text),
        "image_size": resolution,
        "file_size": side,
    }
    if "controlnet" in models:
        out["controlnet_params"] = sd_cache_bench.params_of(models["controlnet"])
    return out


# -- the weights a run trains -----------------------------------------------------------------------


class Watch:
    """A copy of ``params`` (every trainable tensor: a new ControlNet's first steps change only its
    zero-initialised output layers); :meth:`change` is the largest absolute change of any weight since."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.pairs = [(p, p.detach().clone()) for p in params]

    def change(self) -> float:
        return max(float((p.detach() - before).abs().max()) for p, before in self.pairs)


def watch_probe(bench: Bench) -> step_time.Probe:
    """Around each timed difftune ``train()``: the change of the weights it trains (``Trainer.parts.trainable``)."""

    @contextlib.contextmanager
    def probe(trainer: Trainer) -> Iterator[None]:
        watch = Watch(list(trainer.parts.trainable))
        yield
        bench.changes["difftune"].append(watch.change())

    return probe


# -- the peer's loop --------------------------------------------------------------------------------


class CaptionedPngs:
    """The folder's rows as the example's dataset gives them: each image read and transformed on access,
    its caption tokenised (and for the ControlNet its conditioning image read and transformed)."""

    def __init__(self, folder: Path, tokenizer: Any, resolution: int, script: Script, control: bool) -> None:
        self.folder, self.tokenizer, self.size, self.script = folder, tokenizer, resolution, script
        self.rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        self.control = control

    def __len__(self) -> int:
        return len(self.rows)

    def pixels(self, name: str, flip: bool, normalise: bool) -> torch.Tensor:
        """Resize (short side; skipped at the size already), centre crop, optional random flip, to tensor."""
        import numpy as np
        import torch
        from PIL import Image

        with Image.open(self.folder / name) as f:
            image = f.convert("RGB")
        if min(image.size) != self.size:
            scale = self.size / min(image.size)
            size = tuple(int(s * scale) for s in image.size)
            image = image.resize(size, resample=getattr(Image.Resampling, self.script.interpolation))
        left, top = (image.size[0] - self.size) // 2, (image.size[1] - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        if flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
        return (x - 0.5) / 0.5 if normalise else x

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        ids = self.tokenizer(
            [row["text"]],
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        item = {
            "pixel_values": self.pixels(row["file_name"], self.script.random_flip, True),
            "input_ids": ids,
        }
        if self.control:
            item["conditioning_pixel_values"] = self.pixels(row[CONTROL_COLUMN], False, False)
        return item


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    import torch

    out = {}
    for key in items[0]:
        stacked = torch.stack([item[key] for item in items])
        out[key] = stacked.contiguous().float() if stacked.is_floating_point() else stacked
    return out


class PeerLoop:
    """One fresh run of the example script's per-step behaviour (see the module docstring)."""

    def __init__(self, bench: Bench, args: argparse.Namespace) -> None:
        import torch
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.bench, self.script = bench, SCRIPTS[bench.mode]
        self.control = bench.mode == "controlnet"
        models = load_models(bench.setup.source, bench.mode)
        gpu_throughput.fresh_accelerator_state()  # the Trainer's Accelerator may have run before
        bench.runs += 1  # each run its own log folder: the scripts' default tracker, TensorBoard
        acc = Accelerator(
            mixed_precision=args.mixed_precision,
            cpu=bench.setup.device == "cpu",
            log_with="tensorboard",
            project_dir=bench.logs / str(bench.runs),
        )
        acc.init_trackers("peer")
        self.dtype = {"no": torch.float32, "bf16": torch.bfloat16}[args.mixed_precision]
        self.vae, self.text_encoder = models["vae"], models["text_encoder"]
        self.unet, self.scheduler = models["unet"], models["scheduler"]
        for frozen in (self.vae, self.text_encoder) + ((self.unet,) if self.control else ()):
            frozen.requires_grad_(False)
        trained = models["controlnet"] if self.control else self.unet
        trained.train()
        self.ema = None
        if self.script.ema:  # the script loads a second UNet for it; the same weights
            self.ema = EMAModel(trained.parameters(), model_cls=type(trained), model_config=trained.config)
        optimizer = torch.optim.AdamW(
            trained.parameters(), lr=self.script.learning_rate, weight_decay=self.script.weight_decay
        )
        loader = torch.utils.data.DataLoader(
            CaptionedPngs(bench.folder, models["tokenizer"], bench.resolution, self.script, self.control),
            shuffle=True,
            collate_fn=collate,
            batch_size=args.batch_size,
            num_workers=args.workers,
            generator=torch.Generator().manual_seed(args.seed),
        )
        lr_scheduler = get_scheduler("constant", optimizer=optimizer)
        self.trained, self.optimizer, self.loader, self.lr_scheduler = acc.prepare(
            trained, optimizer, loader, lr_scheduler
        )
        if self.ema is not None:
            self.ema.to(acc.device)
        for frozen in (self.vae, self.text_encoder) + ((self.unet,) if self.control else ()):
            frozen.to(acc.device, dtype=self.dtype)
        self.acc, self.batch_size = acc, args.batch_size
        self.watch = Watch([p for p in self.trained.parameters() if p.requires_grad])
        self.losses: list[float] = []

    def train(self, steps: int, laps: sd_cache_bench.Laps) -> None:
        import torch
        import torch.nn.functional as F

        acc, script, dtype = self.acc, self.script, self.dtype
        batches = peer_dit.batches(self.loader)
        T = int(self.scheduler.config.num_train_timesteps)
        for _ in range(steps):
            batch = next(batches)  # the accelerate loader moves it to the device
            laps.lap("load")
            with acc.accumulate(self.trained):
                latents = self.vae.encode(batch["pixel_values"].to(dtype)).latent_dist.sample()
                latents = latents * self.vae.config.scaling_factor
                states = self.text_encoder(batch["input_ids"], return_dict=False)[0]
                laps.lap("encode")
                noise = torch.randn_like(latents)
                t = torch.randint(0, T, (latents.shape[0],), device=latents.device).long()
                if self.control:
                    noisy = self.scheduler.add_noise(latents.float(), noise.float(), t).to(dtype)
                    down, mid = self.trained(
                        noisy,
                        t,
                        encoder_hidden_states=states,
                        controlnet_cond=batch["conditioning_pixel_values"].to(dtype),
                        return_dict=False,
                    )
                    pred = self.unet(
                        noisy,
                        t,
                        encoder_hidden_states=states,
                        down_block_additional_residuals=[s.to(dtype) for s in down],
                        mid_block_additional_residual=mid.to(dtype),
                        return_dict=False,
                    )[0]
                else:
                    noisy = self.scheduler.add_noise(latents, noise, t)
                    pred = self.trained(noisy, t, states, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                if script.gather_loss:  # train_text_to_image.py: logged before the backward pass
                    self.losses.append(acc.gather(loss.repeat(self.batch_size)).mean().item())
                    logs = {"train_loss": self.losses[-1]}
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.trained.parameters(), script.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=script.set_grads_to_none)
            if acc.sync_gradients and self.ema is not None:
                self.ema.step(self.trained.parameters())
            if not script.gather_loss:  # train_controlnet.py: the progress bar's log
                self.losses.append(loss.detach().item())
                logs = {"loss": self.losses[-1], "lr": self.lr_scheduler.get_last_lr()[0]}
            acc.log(logs, step=len(self.losses))
            laps.lap("step")
        acc.end_training()  # once per run: cancels in the difference of two runs
        self.bench.changes[PEER].append(self.watch.change())


# -- the report -------------------------------------------------------------------------------------


def report(args: argparse.Namespace, bench: Bench, result: dict[str, Any]) -> None:
    d, v = bench.description, result["versions"]
    n_bank = int(BANK_SHARE * args.batch_size)
    print(f"difftune training step vs diffusers' {SCRIPTS[args.mode].name}, same model and batch")
    print(peer_dit.device_line(result, f", accelerate {v['accelerate']}; precision {args.mixed_precision}"))
    control = (
        f"; ControlNet.from_unet {d['controlnet_params'] / 1e6:.2f}M params"
        if "controlnet_params" in d
        else ""
    )
    print(
        f"model    {args.size}: UNet {tuple(d['unet_blocks'])} {d['unet_params'] / 1e6:.2f}M params on 4x"
        f"{d['latent_side']}x{d['latent_side']} latents of {d['image_size']} px images; VAE "
        f"{tuple(d['vae_blocks'])} encoder {d['vae_encoder_params'] / 1e6:.2f}M params; text encoder hidden "
        f"{d['text_hidden']}, {d['text_layers']} layers, {d['tokens']} tokens, "
        f"{d['text_encoder_params'] / 1e6:.2f}M params{control}"
    )
    print(
        f"batch    {args.batch_size}: peer {args.batch_size} target images; difftune "
        f"{args.batch_size - n_bank} target + {n_bank} bank; {args.images} PNG files of {d['file_size']} px, "
        f"bank of {args.bank_samples}; peer's loader: {args.workers} workers"
    )
    peer = peer_dit.Peer(PeerLoop, PEER, PHASES)
    peer_dit.print_table(
        args,
        result,
        "(peer's phases, medians: load = the loader's next batch (PNG decode, transforms, tokenising, collate) "
        "and the copy to the device; encode = VAE + text encoder; step = noise, forward, loss, its host sync, "
        f"backward, clipping, AdamW, {'EMA, ' if SCRIPTS[args.mode].ema else ''}the tracker's log)",
        peer,
    )
    a, dt = result["paths"][PEER], result["paths"]["difftune"]

    def changes(path: str) -> str:
        c = result["weight_changes"][path]
        return f"; largest weight change per run {min(c):.2e} to {max(c):.2e} ({len(c)} runs)"

    peer_dit.print_tail(
        args,
        result,
        f"encoding (VAE + text) is {100 * a['phases_ms']['encode'] / a['median_ms']:.1f}% of the peer's step; "
        f"its model step alone (no load, no encode) is {a['phases_ms']['step'] / dt['median_ms']:.3f} x "
        "difftune's whole step",
        peer,
        changes,
    )


def versions() -> dict[str, str]:
    import accelerate

    return {**sd_cache_bench.versions(), "accelerate": accelerate.__version__}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    step_time.start(args)
    import torch

    wall = time.perf_counter()
    with step_time.scratch(args, "difftune-peer-sd-") as work:
        quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(io.StringIO())
        with quiet, peer_dit.quiet_stdout(args):
            bench = prepare(args, work)
        if bench.setup.device == "cuda":  # as the Trainer's train.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        peer = peer_dit.Peer(PeerLoop, PEER, PHASES, bench.run, watch_probe(bench))
        times = peer_dit.measure(bench, args, work, peer)
    clock = step_time.resolve_clock(args, bench.setup.device)
    result = {
        "mode": args.mode,
        "peer": SCRIPTS[args.mode].name,
        "device": bench.setup.device,
        "threads": torch.get_num_threads(),
        "clock": clock,
        "versions": versions(),
        "size": args.size,
        "model": bench.description,
        "mixed_precision": args.mixed_precision,
        "batch_size": args.batch_size,
        "n_bank": int(BANK_SHARE * args.batch_size),
        "images": args.images,
        "workers": args.workers,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "command": "python benchmarks/peer_sd.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "losses": bench.losses,
        "weight_changes": bench.changes,
        **peer_dit.summarise(times, clock, peer),
    }
    result["wall_s"] = time.perf_counter() - wall
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    report(args, bench, result)
    finite = all(math.isfinite(x) for losses in bench.losses.values() for x in losses)
    trained = all(changes and min(changes) > 0 for changes in bench.changes.values())
    return 0 if finite and trained and not peer_dit.unmeasured(result) else 1


if __name__ == "__main__":
    raise SystemExit(main())
