"""Errors a user can fix: the command line prints them as one line, not as a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input (a flag, a path, a config value, a file); the message says what is wrong and how to fix it.

    A ``ValueError``, so that code catching bad values keeps working. Anything else that escapes a
    command is a bug and is shown with its traceback.
    """
