"""The ``difftune`` subcommands, one module each; every module has ``add_parser(subparsers)``.

Modules import only light things at the top, so building the parser (``difftune --help``) does not
import torch, diffusers or transformers; each command checks its inputs first and then imports what it
needs (:func:`start_torch` before it loads a model).
"""

from __future__ import annotations

import argparse
from typing import Any

from difftune.errors import UserError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--set`` and ``--dry-run``: the flags of the commands driven by a YAML experiment config."""
    parser.add_argument(
        "--config", help="YAML experiment config (sections: model, data, bank, objective, train)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set train.max_steps=100",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan, do nothing")


def add_config_command(subparsers: Any, name: str, help: str, func: Any) -> None:
    """Register a subcommand driven by a YAML experiment config (:func:`add_config_args`) that runs ``func``."""
    parser = subparsers.add_parser(name, help=help)
    add_config_args(parser)
    parser.set_defaults(func=func)


def add_model_args(parser: argparse.ArgumentParser | Any) -> None:
    """``--subfolder``, ``--no-ema`` and ``--vae``: which weights of a trained model to load."""
    parser.add_argument(
        "--subfolder", help="model sub-folder (default: EMA weights if present, else transformer/unet)"
    )
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights, not the EMA weights")
    parser.add_argument("--vae", help="VAE hub id or directory for latent models (default: the model's own)")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Refuse integer flags below 1: ``names`` are argparse destinations, e.g. ``"batch_size"``.

    Raises:
        UserError: the message names the first bad flag and its value.
    """
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_model_flags(args: argparse.Namespace, *names: str) -> None:
    """Refuse a model flag that names a missing local path (a typo), before anything is loaded:
    ``names`` are argparse destinations, e.g. ``"vae"``; unset flags are skipped, hub ids left to the hub.

    Raises:
        FileNotFoundError: the message names the flag and its value.
        UserError: the flag names a file, not a model directory.
    """
    from difftune.config.checks import check_model_path

    for name in names:
        if getattr(args, name):
            check_model_path(getattr(args, name), f"--{name.replace('_', '-')}")


def check_scheduler(name: str, what: str = "--scheduler", error: type[UserError] = UserError) -> None:
    """Refuse a scheduler class name that diffusers does not have (imports diffusers).

    Raises:
        UserError (or ``error``): the message names ``what`` and lists the valid names.
    """
    from difftune.sampling.generate import scheduler_names

    if name not in scheduler_names():
        raise error(f"{what} {name!r} is unknown; valid: {', '.join(scheduler_names())}")


def check_domain_guidance(pretrained: str | None, guidance_scale: float) -> None:
    """Refuse ``--domain-guidance`` with a missing model, or at a guidance scale where it does nothing.

    Raises:
        UserError: the message names the flag and the fix.
    """
    if not pretrained:
        return
    from difftune.config.checks import check_model_path

    check_model_path(pretrained, "--domain-guidance")
    if guidance_scale == 1.0:
        raise UserError("--domain-guidance needs --guidance-scale > 1: at 1 the guiding model has no effect")


def start_torch() -> None:
    """Import torch and let float32 matrix products use TF32 (``set_float32_matmul_precision("high")``).

    Every command that runs a model calls this once its inputs are checked and before it loads the
    model, so that building the parser and refusing bad input do not wait for torch to import.
    """
    import torch

    torch.set_float32_matmul_precision("high")


# ``--dtype`` of the commands that sample (``sample``, ``eval fid --checkpoint``): the first is the default
INFERENCE_DTYPES = ("float32", "bfloat16", "float16")


def add_dtype_arg(parser: argparse.ArgumentParser | Any, default: str | None = INFERENCE_DTYPES[0]) -> None:
    """``--dtype``: the precision the model runs in while it samples (an invocation option, no config)."""
    parser.add_argument(
        "--dtype",
        choices=INFERENCE_DTYPES,
        default=default,
        help="precision the model (denoiser, ControlNet, VAE) runs in while sampling (default float32); "
        "bfloat16 or float16 halve its memory on a GPU; float16 needs a CUDA device",
    )


def default_device() -> str:
    """Where ``difftune sample`` runs: the GPU when there is one, else the CPU (imports torch)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(name: str | None, device: Any) -> Any:
    """The ``torch.dtype`` of ``--dtype name`` (``None``: float32) for sampling on ``device`` (imports torch).

    Raises:
        UserError: float16 on the CPU, whose kernels lack (or crawl at) much of float16.
    """
    import torch

    name = name or INFERENCE_DTYPES[0]
    if name not in INFERENCE_DTYPES:
        raise UserError(f"--dtype {name!r} is unknown; valid: {', '.join(INFERENCE_DTYPES)}")
    if name == "float16" and torch.device(device).type == "cpu":
        raise UserError(
            "--dtype float16 needs a CUDA device and this runs on the CPU; use --dtype bfloat16 on the CPU"
        )
    return getattr(torch, name)
