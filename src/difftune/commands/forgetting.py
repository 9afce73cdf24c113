"""``difftune forgetting``: the chain-of-forgetting probes on any fine-tuned / pre-trained pair.

    difftune forgetting --finetuned runs/x/final --pretrained facebook/DiT-XL-2-256 \\
        --heldout data/food-101/test --features inception --inception-weights pt_inception.pth --out probes/

``--heldout`` is an image folder with one sub-directory per target class (sorted names give the
labels, as in training). It is the FID reference of the swap probe and the data of the
transfer-gap curve. A text-conditional model (Stable Diffusion, a ControlNet) takes its conditions
from ``--prompts FILE`` (one prompt per line: one for every class, or one per class in the sorted
order of the class folders) and, for a ControlNet, ``--control-image`` (one for all prompts, or one
per prompt): class ``c``'s condition samples the swap probe and conditions class ``c``'s held-out
images in the transfer gap.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from difftune.commands import check_model_flags, check_positive, check_scheduler, start_torch
from difftune.config.sampling import add_sampling_args, sampling_spec_from_args
from difftune.errors import UserError


def _fractions(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise UserError(f"--fractions {text!r} must be comma-separated numbers in [0, 1], e.g. 0,0.5,1")
    return values


def cmd_forgetting(args: argparse.Namespace) -> int:
    """Run both probes; write ``forgetting_swap.{json,png}`` and ``forgetting_gap.{json,png}``."""
    fractions = _fractions(args.fractions) if args.fractions is not None else None
    check_positive(args, "num_per_class", "gap_bins", "gap_draws", "batch_size", "resolution")
    spec = sampling_spec_from_args(args)
    check_model_flags(args, "finetuned", "pretrained", "vae")
    if not Path(args.heldout).is_dir():
        raise FileNotFoundError(f"--heldout {args.heldout!r} is not a directory of class sub-folders")
    from difftune.commands.eval_fid import check_condition_inputs

    check_condition_inputs(None, args.prompts, args.control_image)
    check_scheduler(spec.scheduler)
    from difftune.analysis.forgetting import (
        DEFAULT_FRACTIONS,
        save_swap_probe,
        save_transfer_gap,
        swap_probe,
        transfer_gap,
    )

    if fractions is None:
        fractions = list(DEFAULT_FRACTIONS)
    if args.dry_run:
        print(
            f"would probe {args.finetuned} against {args.pretrained} at fractions {fractions} "
            f"({args.num_per_class} samples per class; {spec.describe()}) and the transfer gap over "
            f"{args.gap_bins} bins of t on {args.heldout}; outputs in {args.out}"
        )
        return 0
    start_torch()
    import torch

    from difftune.backbones import ConditionRequest, load_trained
    from difftune.commands.sample import read_prompts
    from difftune.config.experiment import DataConfig
    from difftune.data.targets import load_target_images
    from difftune.metrics import compute_feature_stats, fid_from_stats
    from difftune.metrics.extractors import build_extractor
    from difftune.sampling.generate import build_scheduler, to_unit_range

    device = "cuda" if torch.cuda.is_available() else "cpu"
    finetuned = load_trained(args.finetuned, args.subfolder, not args.no_ema, args.vae)
    request = ConditionRequest(
        prompts=read_prompts(None, args.prompts, "--prompts"),
        controls=args.control_image or (),
        model=args.finetuned,
        prompt_flag="--prompts",
    )
    finetuned.family.check_request(request)  # before the second model and the held-out set are read
    pretrained = load_trained(args.pretrained, args.pretrained_subfolder, True, args.vae)
    backbone, codec = finetuned.backbone.to(device).eval(), finetuned.codec.to(device)
    resolution = args.resolution or codec.image_size(backbone.sample_shape)
    heldout = load_target_images(
        DataConfig(source="folder", path=args.heldout),
        resolution,
        codec.image_channels(backbone.sample_shape),
    )
    num_classes = len(heldout.class_names)
    heldout_cond = finetuned.family.heldout_conditions(finetuned, heldout.labels, num_classes, request)
    extractor = build_extractor(args.features, args.inception_weights)
    reference = compute_feature_stats(to_unit_range(heldout.images), extractor, device=device, progress=True)

    def score(x: torch.Tensor) -> float:
        images = torch.cat([to_unit_range(codec.decode(chunk)) for chunk in x.split(args.batch_size)])
        return fid_from_stats(reference, compute_feature_stats(images, extractor, device=device))

    present = heldout.labels.unique()  # one row per class present in the held-out set, ascending
    classes = finetuned.family.heldout_conditions(finetuned, present, num_classes, request)
    cond = classes.select(torch.arange(classes.batch_size).repeat_interleave(args.num_per_class))
    swap = swap_probe(
        backbone,
        pretrained.backbone.to(device).eval(),
        build_scheduler(
            spec.scheduler,
            finetuned.scheduler_config,
            finetuned.backbone.sample_shape,
            spec.scheduler_options,
        ),
        cond,
        spec.seeds(0, cond.batch_size),
        score,
        fractions,
        spec.guidance_scale,
        spec.steps,
        device,
    )
    out = Path(args.out)
    save_swap_probe(swap, out / "forgetting_swap.json")
    x0 = torch.cat(
        [codec.encode(chunk.to(device))[0].cpu() for chunk in heldout.images.split(args.batch_size)]
    )
    gap = transfer_gap(
        backbone,
        pretrained.backbone,
        finetuned.scheduler_config,
        x0,
        heldout_cond,
        args.gap_bins,
        args.gap_draws,
        spec.seed,
        args.batch_size,
        device,
        axis=args.gap_axis,
    )
    save_transfer_gap(gap, args.gap_axis, out / "forgetting_gap.json")
    for r in swap:
        print(f"f={r['fraction']:.2f}  fid {r['score']:.3f}")
    print(f"wrote {out / 'forgetting_swap.json'} and {out / 'forgetting_gap.json'} (+ PNGs)")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``difftune forgetting``."""
    p = subparsers.add_parser(
        "forgetting", help="chain-of-forgetting probes: swap FID per hand-over fraction, transfer gap"
    )
    p.add_argument(
        "--finetuned", required=True, help="fine-tuned model (difftune final/checkpoint dir, EMA by default)"
    )
    p.add_argument("--pretrained", required=True, help="the pre-trained source model (hub id or directory)")
    p.add_argument("--heldout", required=True, help="held-out target images, one sub-directory per class")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="a text-conditional model's prompts, one per line: one for all classes, or one per class",
    )
    p.add_argument(
        "--control-image",
        action="append",
        help="a ControlNet's control image: one for all prompts, or one per prompt",
    )
    p.add_argument("--subfolder", help="sub-folder of the fine-tuned model (default: EMA weights if present)")
    p.add_argument("--no-ema", action="store_true", help="use the fine-tuned model's trained weights")
    p.add_argument("--pretrained-subfolder", help="sub-folder of the pre-trained model")
    p.add_argument("--vae", help="VAE for latent models (default: the models' own)")
    p.add_argument("--features", default="inception", help="inception | digits:PATH | module:function")
    p.add_argument("--inception-weights", help="local FID Inception weights (offline)")
    p.add_argument("--fractions", help="hand-over fractions (default 0,0.1,...,1)")
    p.add_argument("--num-per-class", type=int, default=50, help="samples per class for each fraction")
    add_sampling_args(p)  # the guidance applies to the fine-tuned model; every fraction uses the same seeds
    p.add_argument("--gap-bins", type=int, default=10, help="bins of t for the transfer gap")
    p.add_argument(
        "--gap-axis",
        choices=["index", "log_snr"],
        default="index",
        help="bins of the transfer gap: equal ranges of t (--gap-bins of them), or fixed log-SNR ranges scored "
        "in x0 space, which compare across processes",
    )
    p.add_argument("--gap-draws", type=int, default=4, help="noise draws per sample and bin")
    p.add_argument("--resolution", type=int, help="image size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64, help="decode / encode batch size")
    p.add_argument("--out", default="forgetting", help="output folder")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan, do nothing")
    p.set_defaults(func=cmd_forgetting)
