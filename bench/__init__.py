"""Benchmarks: native and axnet side by side, reported as ratios."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from types import FrameType


def unwind_on_sigterm() -> None:
    """Make SIGTERM (a timeout, a kill) unwind the benchmark as an exception
    does, so that the test hosts and servers it started are stopped and
    deleted, not left behind as the default action would leave them."""

    def _exit(signum: int, frame: FrameType | None) -> None:
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def write_results(out: Path, name: str, data: object, summary: str) -> None:
    """NAME.json (the figures, for scripts) and NAME.md (the summary) in
    *out*; the summary is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{name}.md").write_text(summary)
    print(summary)
