"""Handles on the app's threads name tasks, never reusable ids."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from axnet.intercept._tasks import Errno, Gone, Tasks


def _child() -> tuple[subprocess.Popen[bytes], int]:
    """A process holding a socket; (process, the socket's fd number there)."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time; s = socket.socket(); print(s.fileno(), flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    return child, int(child.stdout.readline())


def test_a_dead_tasks_cached_handles_fail_instead_of_reaching_another() -> None:
    child, target = _child()
    try:
        tasks = Tasks(lambda ident: True)
        # fd 3 is the child's socket (0-2 are stdio).
        fd = tasks.getfd(child.pid, target)
        with socket.socket(fileno=fd) as sock:
            assert sock.type == socket.SOCK_STREAM
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        # The cached pidfd names the dead task: it cannot reach anything else
        # that the kernel might give the same pid.
        with pytest.raises(Gone):
            tasks.getfd(child.pid, target)
        tasks.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_memory_of_a_fresh_handle_is_trusted_only_when_the_notification_is_live() -> None:
    child, _target = _child()
    try:
        tasks = Tasks(lambda ident: False)  # the notification is gone
        with pytest.raises(Gone):
            tasks.write(child.pid, 1, [(0x1000, b"x")])
        tasks.close()
    finally:
        child.kill()
        child.wait()


def test_bad_addresses_are_efault() -> None:
    child, _target = _child()
    try:
        tasks = Tasks(lambda ident: True)
        with pytest.raises(Errno) as excinfo:
            tasks.read(child.pid, 1, 8, 4)
        assert excinfo.value.errno == 14  # EFAULT
        tasks.close()
    finally:
        child.kill()
        child.wait()
