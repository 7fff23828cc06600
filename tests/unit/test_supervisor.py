"""The supervisor's own failure handling, without a daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from axnet import _cli
from axnet._supervisor import EngineFailed, RunOptions, Supervisor


class _BrokenEngine:
    def serve(self) -> None:
        raise RuntimeError("a bug in the engine")


def test_an_engine_that_dies_stops_the_app_instead_of_leaving_it_hanging() -> None:
    # Nobody would answer the app's trapped calls any more: each would hang.
    app = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pidfd = os.pidfd_open(app.pid)
    try:
        supervisor = Supervisor(
            RunOptions(argv=("app",), vip=None, name="", labels=(), runtime_dir=Path("/tmp"))
        )
        supervisor.engine = _BrokenEngine()  # type: ignore[assignment]
        supervisor._serve_engine(pidfd)
        assert app.wait(timeout=10) == -signal.SIGKILL
        assert supervisor.engine_failed
    finally:
        os.close(pidfd)
        if app.poll() is None:
            app.kill()
            app.wait()


def test_axnet_run_reports_a_failed_engine_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failed(options: RunOptions) -> int:
        raise EngineFailed(
            "the interception engine failed (see the log above); the app was stopped"
        )

    monkeypatch.setattr("axnet._supervisor.run", failed)
    assert _cli.main(["run", "--", "true"]) == 1
    assert capsys.readouterr().err == (
        "axnet run: the interception engine failed (see the log above); the app was stopped\n"
    )
