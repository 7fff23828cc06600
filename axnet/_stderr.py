"""What axnet says on standard error outlives whoever reads it.

A daemon started as ``axnet daemon 2>&1 | head -1``, or whose log reader
was stopped, finds its standard error a pipe with no reader.  Writing there
fails with EPIPE (Python ignores SIGPIPE), and the daemon must not stop
serving for it: from the first such failure on, what it says goes to
/dev/null, which also keeps the interpreter's final flush from failing
(an exit status of 120 at a clean stop).
"""

from __future__ import annotations

import logging
import os
import sys


def say(text: str) -> None:
    """*text* as a line on standard error, if anyone still reads it."""
    try:
        print(text, file=sys.stderr, flush=True)
    except BrokenPipeError:
        _silence()


def _silence() -> None:
    """Send standard error to /dev/null from now on."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stderr.fileno())
    finally:
        os.close(devnull)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Logging to standard error that goes quiet once nobody reads it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            _silence()
        else:
            super().handleError(record)
