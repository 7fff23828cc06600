"""The benchmarks are tools too: stopped, they leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from axnet.intercept._sockdiag import descendants
from axnet.testing import can_make_netns, has_program

REPO = Path(__file__).resolve().parents[2]
NETNS_DIR = Path("/run/netns")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""  # exited meanwhile


def _hosts_of(pid: int) -> list[str]:
    prefix = f"axt-{pid}-"
    return [n for n in os.listdir(NETNS_DIR) if n.startswith(prefix)] if NETNS_DIR.is_dir() else []


@pytest.mark.netns
@pytest.mark.slow
def test_a_benchmark_stopped_with_sigterm_removes_its_hosts_and_processes(
    require: Callable[[str | None], None],
) -> None:
    require(can_make_netns())
    for program in ("iperf3", "redis-server", "redis-benchmark"):  # bench.core checks them first
        require(has_program(program))
    bench = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.core",
            "--quick",
            "--only",
            "roundtrips",
            "--out",
            "/nonexistent",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Stop it mid-run: once its test host exists and an app runs under axnet there.
        deadline = time.monotonic() + 120
        started: list[int] = []
        while time.monotonic() < deadline and bench.poll() is None:
            started = descendants(bench.pid)
            commands = [_cmdline(p) for p in started]
            if _hosts_of(bench.pid) and any(b"\0run\0" in c for c in commands):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the benchmark did not start an app: {bench.communicate()[1][-2000:]!r}")
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert b"Traceback" not in err
    assert _hosts_of(bench.pid) == []
    assert [p for p in started if _alive(p)] == []
