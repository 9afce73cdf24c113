"""Command-line interface: ``difftune {train,continual,bank,sample,demo,eval,forgetting,export,convergence,report}``.

The subcommands live in :mod:`difftune.commands`, one module each; this module assembles the parser
and runs the chosen command. Every subcommand takes ``--dry-run``: it validates its inputs, prints what
it would do, and exits. Errors a user can fix (:data:`USER_ERRORS`) are printed as one line
(``difftune: error: ...``) with exit code 2, or as a full traceback with ``-v``. Any other exception is
a bug and propagates with its traceback. Nothing here imports torch: a command checks its inputs
first and imports torch, diffusers and transformers only to run a model
(:func:`~difftune.commands.start_torch`), so ``--help`` and refusals of bad input come at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from difftune.commands import (
    bank,
    continual,
    convergence,
    demo,
    eval_fid,
    export,
    forgetting,
    report,
    sample,
    train,
)
from difftune.errors import UserError

# bad input: UserError (ConfigError among them), and the OS's own errors for missing or protected paths
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, PermissionError)

FULL_DISK = "No space left on device"
COMMANDS = (train, continual, bank, sample, demo, eval_fid, forgetting, export, convergence, report)


def build_parser() -> argparse.ArgumentParser:
    """The ``difftune`` argument parser (builds without importing diffusers)."""
    parser = argparse.ArgumentParser(
        prog="difftune", description="Diff-Tuning for diffusion models (NeurIPS 2024)."
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="verbose logging, and a full traceback on errors"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``difftune`` console script: run the command, report errors; the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if not args.verbose:  # peft imports bitsandbytes when it is installed; its CPU backend warns of a 4-bit
        logging.getLogger("bitsandbytes.backends.cpu").setLevel(logging.ERROR)  # kernel difftune never uses
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if args.verbose:
            traceback.print_exc()
            return 2
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"difftune: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difftune: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # a full disk, as safetensors or torch reports it, is the user's to fix
        if FULL_DISK not in str(err) or args.verbose:
            raise
        print(
            f"difftune: error: {FULL_DISK} ({type(err).__name__}); free space, then run the same command "
            "again (a bank resumes by itself, a training run with --set train.resume=latest)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
