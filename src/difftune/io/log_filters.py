"""Silencing one known, misleading log message of a library while a call runs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def dropping_messages(logger: str, prefix: str) -> Iterator[None]:
    """Drop the records of ``logger`` whose message starts with ``prefix`` inside the block."""
    log = logging.getLogger(logger)
    drop = _DropMessages(prefix)
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)
