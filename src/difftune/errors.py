"""Errors a user can fix: the command line prints them as one line, not as a traceback."""

from __future__ import annotations

import os
from pathlib import Path


class UserError(ValueError):
    """Bad input (a flag, a path, a config value, a file); the message says what is wrong and how to fix it.

    A ``ValueError``, so that code catching bad values keeps working. Anything else that escapes a
    command is a bug and is shown with its traceback.
    """


def shown_path(path: str) -> str:
    """``path`` as a message shows it: relative to the working directory when it lies below it."""
    local = Path(path).resolve()
    return os.path.relpath(local) if Path(path).exists() and local.is_relative_to(Path.cwd()) else path
