"""Benchmarks: native and axnet side by side, reported as ratios."""

from __future__ import annotations

import signal
import sys
from types import FrameType


def unwind_on_sigterm() -> None:
    """Make SIGTERM (a timeout, a kill) unwind the benchmark as an exception
    does, so that the test hosts and servers it started are stopped and
    deleted, not left behind as the default action would leave them."""

    def _exit(signum: int, frame: FrameType | None) -> None:
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
