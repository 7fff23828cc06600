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

from axnet.testing import can_make_netns

REPO = Path(__file__).resolve().parents[2]
NETNS_DIR = Path("/run/netns")


def _descendants(pid: int) -> set[int]:
    """Living descendants of *pid*, from /proc/PID/task/TID/children."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _hosts_of(pid: int) -> list[str]:
    prefix = f"axt-{pid}-"
    return [n for n in os.listdir(NETNS_DIR) if n.startswith(prefix)] if NETNS_DIR.is_dir() else []


@pytest.mark.netns
@pytest.mark.slow
def test_a_benchmark_stopped_with_sigterm_removes_its_hosts_and_processes(
    require: Callable[[str | None], None],
) -> None:
    require(can_make_netns())
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
        started: set[int] = set()
        while time.monotonic() < deadline and bench.poll() is None:
            started = _descendants(bench.pid)
            commands = [Path(f"/proc/{p}/cmdline").read_bytes() for p in started if _alive(p)]
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
