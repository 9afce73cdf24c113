"""``difftune sample``: images from a checkpoint or a diffusers model, into a folder.

Class-conditional models take ``--labels``; text-conditional ones ``--prompt`` (or
``--prompts-file``), and a ControlNet also ``--control-image`` (one per prompt, or one for all).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.commands import (
    add_dtype_arg,
    add_model_args,
    check_domain_guidance,
    check_model_flags,
    check_positive,
    check_scheduler,
    default_device,
    inference_dtype,
    start_torch,
)
from difftune.config.sampling import SamplingSpec, add_sampling_args, sampling_spec_from_args
from difftune.errors import UserError
from difftune.io.atomic import atomic_write_json

MANIFEST = "difftune_samples.json"
GRID = "grid.png"
DEFAULT_LABELS = "0"

if TYPE_CHECKING:
    import torch

    from difftune.backbones.base import Backbone
    from difftune.backbones.conditioning import Conditioning
    from difftune.backbones.loading import LoadedModel


def cmd_sample(args: argparse.Namespace) -> int:
    """Check the flags and the model; write the images and a grid (or print the plan); return the exit code."""
    _check_condition_flags(args)
    prompts = read_prompts(args.prompt, args.prompts_file)
    labels_text = DEFAULT_LABELS if args.labels is None else args.labels
    labels = [] if prompts else parse_labels(labels_text)
    check_positive(args, "per_label", "batch_size")
    spec = sampling_spec_from_args(args)
    check_model_flags(args, "model", "vae")
    check_domain_guidance(args.domain_guidance, spec.guidance_scale)
    check_scheduler(spec.scheduler)  # imports diffusers: after the checks that need no library
    inference_dtype(args.dtype, default_device())  # float16 on the CPU is refused before any loading
    _check_model_conditions(args, prompts)
    details = f", domain guidance from {args.domain_guidance}" if args.domain_guidance else ""
    details += f", in {args.dtype}" if args.dtype != "float32" else ""
    if prompts:
        return _sample_prompts(args, prompts, spec, details)
    if args.dry_run:
        total = len(labels) * args.per_label
        from difftune.backbones.saving import inference_subfolder

        subfolder = inference_subfolder(args.model, args.subfolder, not args.no_ema)
        print(
            f"would sample {total} images (labels {labels} x {args.per_label}) from {args.model}"
            f"{' [' + subfolder + ']' if subfolder else ''} "
            f"with {spec.describe()}{details}, seeds {spec.seed}..{spec.seed + total - 1} into {args.out}"
        )
        return 0
    return _load_and_sample(args, spec, len(labels) * args.per_label, lambda loaded: {"labels": labels})


def _check_condition_flags(args: argparse.Namespace) -> None:
    """Refuse flags that exclude each other, before anything is read: ``--labels`` with prompts (one of
    them would be ignored), ``--control-image`` without prompts (a ControlNet is text-conditional)."""
    text = bool(args.prompt or args.prompts_file)
    if text and args.labels is not None:
        raise UserError(
            "--labels (class-conditional models) and --prompt/--prompts-file (text-conditional models) "
            "exclude each other; give only the one your model takes"
        )
    if args.control_image and not text:
        raise UserError(
            "--control-image goes with --prompt or --prompts-file (a ControlNet is text-conditional); "
            "add the prompts, or leave out --control-image"
        )


def _check_model_conditions(args: argparse.Namespace, prompts: Sequence[str]) -> None:
    """Refuse what ``--model`` cannot take (prompts or labels, control images) from its config alone,
    before any weights are read. A model that only loading tells about (an adapter, which loads onto
    its base; a hub model not in the local cache) is checked once it is loaded."""
    from difftune.backbones import ConditionRequest
    from difftune.backbones.adapters import adapter_directory
    from difftune.backbones.loading import peek_backbone
    from difftune.backbones.saving import inference_subfolder

    if adapter_directory(args.model, not args.no_ema and args.subfolder is None) is not None:
        return
    subfolder = inference_subfolder(args.model, args.subfolder, not args.no_ema)
    try:
        backbone = peek_backbone(args.model, subfolder, local_only=not Path(args.model).exists())
    except OSError:  # not in the local hub cache, or a part only loading finds: loading reports it
        return
    request = ConditionRequest(prompts=prompts, controls=args.control_image or (), model=args.model)
    backbone.family.check_request(request)


def parse_labels(text: str) -> list[int]:
    """Comma-separated labels -> list (the model's family checks them against its classes).

    Raises:
        ValueError: not integers, or empty.
    """
    try:
        labels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        labels = []
    if not labels:
        raise UserError(f"--labels {text!r} must be comma-separated integers, e.g. 0,1,2")
    return labels


def sample_to_folder(
    loaded: LoadedModel,
    labels: Sequence[int],
    per_label: int,
    out: str | os.PathLike,
    spec: SamplingSpec | None = None,
    batch_size: int = 64,
    device: str | None = None,
    overwrite: bool = False,
    guide: Backbone | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Generate ``per_label`` images for each class label into ``out`` (one PNG each, plus ``grid.png``).

    Image i (in label-major order) uses seed ``spec.seed + i`` (default spec: :class:`SamplingSpec`'s
    defaults). ``out`` must hold no images, or only those of an earlier ``difftune sample`` with
    ``overwrite``. :data:`MANIFEST` lists the images written (``eval fid --fake`` scores exactly
    those, not the grid). ``guide``: the pre-trained model as the guidance branch (domain guidance,
    :func:`~difftune.sampling.generate.generate`). ``dtype``: the model (and ``guide``) is cast to it to
    sample (``--dtype``; ``None`` keeps it as loaded, float32); the images are float32 all the same.
    Returns the grid's path.

    Raises:
        UserError: ``out`` holds images (of an earlier run without ``overwrite``, or of someone else).
    """
    from difftune.backbones import ConditionRequest

    cond, tags = loaded.family.sample_conditions(loaded, ConditionRequest(labels=list(labels)))
    return sample_conditions(
        loaded, cond, tags, per_label, out, spec, batch_size, device, overwrite, guide, dtype
    )


def sample_conditions(
    loaded: LoadedModel,
    cond: Conditioning,
    tags: Sequence[str],
    per_condition: int,
    out: str | os.PathLike,
    spec: SamplingSpec | None = None,
    batch_size: int = 64,
    device: str | None = None,
    overwrite: bool = False,
    guide: Backbone | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Generate ``per_condition`` images for each of the conditions ``cond`` (named by ``tags`` in
    the file names) into ``out``; the rules of :func:`sample_to_folder`. Returns the grid's path."""
    import torch
    from tqdm.auto import tqdm

    from difftune.io.images import save_grid, save_png
    from difftune.sampling.generate import generate_with_spec, model_dtype, to_unit_range

    spec = spec or SamplingSpec()
    device = device or default_device()
    backbone = loaded.to(device, dtype).backbone.eval()
    guide = guide.to(device=device, dtype=dtype).eval() if guide is not None else None
    codec = loaded.codec
    rows = torch.arange(cond.batch_size).repeat_interleave(per_condition)
    out = Path(out)
    _clear_sample_folder(out, overwrite)
    images, names = [], []
    for start in tqdm(range(0, rows.numel(), batch_size), desc="sampling"):
        chunk = rows[start : start + batch_size]
        x = generate_with_spec(
            backbone, loaded.scheduler_config, spec, cond.select(chunk), start, device, guide
        )
        batch = to_unit_range(codec.decode(x)).cpu()
        for offset, image in enumerate(batch):
            i = start + offset
            names.append(f"{i:05d}_{tags[int(rows[i])]}_seed{spec.seed + i}.png")
            save_png(image, out / names[-1])
        images.append(batch)
    grid = out / GRID
    save_grid(torch.cat(images), grid, nrow=per_condition, upscale=max(1, 64 // images[0].shape[-1]))
    from difftune.process import sampler_for

    sampler = sampler_for(spec.scheduler, loaded.scheduler_config)  # the sampler that ran
    settings = {"scheduler": sampler, "steps": spec.steps, "guidance_scale": spec.guidance_scale}
    settings["domain_guidance"] = guide is not None
    settings["noise_schedule"] = loaded.scheduler_config
    settings["dtype"] = str(model_dtype(backbone)).removeprefix("torch.")  # the precision it ran in
    atomic_write_json(out / MANIFEST, {"images": names, "grid": GRID, "seed": spec.seed, **settings})
    return grid


def _guide(args: argparse.Namespace, loaded: LoadedModel) -> Backbone | None:
    """The ``--domain-guidance`` model, checked against ``loaded``, or None."""
    if not args.domain_guidance:
        return None
    from difftune.sampling.generate import load_guide

    return load_guide(args.domain_guidance, loaded, args.vae)


def read_prompts(
    prompts: Sequence[str] | None, prompts_file: str | None, flag: str = "--prompts-file"
) -> list[str]:
    """The prompts of ``--prompt`` (repeatable) and ``--prompts-file`` (one per line; ``flag`` names it in
    messages), in that order.

    Raises:
        UserError: the prompts file is missing, or holds no prompt (only blank lines).
    """
    found = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(
                f"{flag} {prompts_file!r} does not exist; give a text file with one prompt per line"
            )
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise UserError(
                f"{flag} {prompts_file!r} holds no prompts (it is empty or blank); write one prompt per line"
            )
        found += lines
    return found


def check_control_images(controls: Sequence[str], prompts: Sequence[str]) -> list[str]:
    """``--control-image`` files: one for all prompts or one per prompt, each an existing file.

    Raises:
        UserError: another count, or a missing file.
    """
    controls = list(controls)
    if controls and len(controls) not in (1, len(prompts)):
        raise UserError(f"give one --control-image, or one per prompt ({len(prompts)}); got {len(controls)}")
    missing = [c for c in controls if not Path(c).is_file()]
    if missing:
        raise UserError(f"--control-image {missing[0]!r} does not exist")
    return controls


def _sample_prompts(args: argparse.Namespace, prompts: list[str], spec: SamplingSpec, details: str) -> int:
    """``difftune sample --prompt ...``: a text-conditional model (with ``--control-image`` for a ControlNet)."""
    controls = check_control_images(args.control_image or (), prompts)
    total = len(prompts) * args.per_label
    if args.dry_run:
        print(
            f"would sample {total} images ({len(prompts)} prompts x {args.per_label}) from {args.model} "
            f"with {spec.describe()}{details}, seeds {spec.seed}..{spec.seed + total - 1} into {args.out}"
        )
        return 0
    return _load_and_sample(
        args,
        spec,
        total,
        lambda loaded: {
            "prompts": prompts,
            "controls": controls,
            "model": loaded.weights[0] or loaded.source,
        },
    )


def _load_and_sample(
    args: argparse.Namespace, spec: SamplingSpec, total: int, request: Callable[[Any], dict[str, Any]]
) -> int:
    """Load the model and write ``total`` samples: ``request(loaded)`` gives the fields of the family's
    :class:`~difftune.backbones.ConditionRequest` (``model`` defaults to ``--model``)."""
    start_torch()
    from difftune.backbones import ConditionRequest, load_trained

    device = default_device()
    dtype = inference_dtype(args.dtype, device)
    loaded = load_trained(args.model, args.subfolder, not args.no_ema, args.vae)
    guide = _guide(args, loaded)
    fields = {"model": args.model, **request(loaded)}
    cond, tags = loaded.family.sample_conditions(loaded, ConditionRequest(**fields))
    path = sample_conditions(
        loaded,
        cond,
        tags,
        args.per_label,
        args.out,
        spec,
        args.batch_size,
        device,
        overwrite=args.overwrite,
        guide=guide,
        dtype=dtype,
    )
    print(f"wrote {total} images and {path}")
    return 0


def listed_samples(folder: str | os.PathLike[str]) -> list[Path] | None:
    """The images a ``difftune sample`` run wrote into ``folder`` (from its manifest), or ``None``."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return [Path(folder) / name for name in json.loads(path.read_text())["images"]]


def _clear_sample_folder(out: Path, overwrite: bool) -> None:
    """Refuse a folder with images in it, unless they are an earlier sample run's and ``overwrite``."""
    from difftune.io.images import image_files

    present = image_files(out) if out.is_dir() else []
    if not present:
        return
    ours = set(listed_samples(out) or []) | {out / GRID}
    foreign = [p for p in present if p not in ours]
    if foreign:
        raise UserError(
            f"--out {str(out)!r} holds {len(foreign)} images that difftune sample did not write "
            f"(e.g. {foreign[0].name}); choose an empty folder"
        )
    if not overwrite:
        raise UserError(
            f"--out {str(out)!r} holds {len(present)} images of an earlier difftune sample; "
            "give --overwrite to replace them, or choose another folder"
        )
    for path in present:
        path.unlink()
    (out / MANIFEST).unlink(missing_ok=True)


def add_parser(subparsers: Any) -> None:
    """Register ``difftune sample``."""
    p = subparsers.add_parser(
        "sample", help="generate images from a checkpoint or a diffusers model (class labels or prompts)"
    )
    p.add_argument(
        "--model", required=True, help="checkpoint / final directory, pipeline directory or hub id"
    )
    add_model_args(p)
    p.add_argument("--labels", help=f"comma-separated class labels, e.g. 0,1,2 (default {DEFAULT_LABELS})")
    p.add_argument("--prompt", action="append", help="a prompt, for a text-conditional model (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument(
        "--control-image",
        action="append",
        help="a ControlNet's control image: one for all prompts, or one per prompt",
    )
    p.add_argument("--per-label", type=int, default=8, help="images per label (or per prompt)")
    p.add_argument(
        "--domain-guidance",
        metavar="PRETRAINED",
        help="domain guidance: the pre-trained model (hub id or directory) as the guidance branch, "
        "with --guidance-scale > 1",
    )
    add_sampling_args(p)
    add_dtype_arg(p)
    p.add_argument(
        "--batch-size", type=int, default=64, help="images per forward pass (does not change results)"
    )
    p.add_argument("--out", default="samples", help="output folder (must hold no images)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the images of an earlier sample run in --out"
    )
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan, do nothing")
    p.set_defaults(func=cmd_sample)
