"""Errors a user can fix: the command line prints them as one line, not as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a flag, a path, a config value); the message says what is wrong and how to fix it."""
