"""Launch a Python child under the real filter and drive its notifications by hand."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from axnet.intercept._bpf import NR_GETPEERNAME, NR_GETSOCKNAME, build_filter
from axnet.intercept._launcher import Launched, launch
from axnet.intercept._libc import Notification, NotifyFd

#: Any one wait in these tests, in seconds.
TIMEOUT = 10.0
CHILD_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

#: Prepended to every child script: `report(**fields)` writes the result file.
PRELUDE = """\
import ctypes, errno, json, os, signal, socket, sys, threading, time
def report(**fields):
    with open(sys.argv[1], "w") as f:
        json.dump(fields, f)
"""


def _wait_readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _wait_notification(notify: NotifyFd, timeout: float) -> int:
    """poll() events of the listener: POLLIN when a notification is pending,
    POLLHUP alone once every task under the filter has exited."""
    poller = select.poll()
    poller.register(notify.fileno(), select.POLLIN)
    events = poller.poll(timeout * 1000)
    return events[0][1] if events else 0


@attrs.define
class Child:
    launched: Launched
    result_path: Path
    status: int | None = None

    @property
    def pid(self) -> int:
        return self.launched.pid

    def notification(self, timeout: float = TIMEOUT) -> Notification:
        events = _wait_notification(self.launched.notify, timeout)
        if not events & select.POLLIN:
            raise AssertionError(f"no notification within {timeout} s (poll events {events:#x})")
        return self.launched.notify.recv()

    def no_notification(self, timeout: float) -> bool:
        return not _wait_notification(self.launched.notify, timeout) & select.POLLIN

    def wait(self, timeout: float = TIMEOUT) -> int:
        """The child's exit code (negative: killed by that signal).

        getsockname/getpeername raised meanwhile are let through: CPython calls
        them on its own (the repr in an "unclosed socket" ResourceWarning).
        Any other notification is a test failure.
        """
        if self.status is None:
            deadline = time.monotonic() + timeout
            notify = self.launched.notify
            poller = select.poll()
            poller.register(self.launched.pidfd, select.POLLIN)
            if not notify.closed:
                poller.register(notify.fileno(), select.POLLIN)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"child {self.pid} still running after {timeout} s")
                ready = {fd for fd, _ in poller.poll(left * 1000)}
                if self.launched.pidfd in ready:
                    break
                if ready:
                    try:
                        n = notify.recv()
                    except OSError:
                        continue  # the task died between poll and recv
                    if n.nr not in (NR_GETSOCKNAME, NR_GETPEERNAME):
                        notify.respond(n.id, error=errno.ENOSYS)
                        raise AssertionError(f"unexpected notification while waiting: {n}")
                    notify.respond_continue(n.id)
            _, status = os.waitpid(self.pid, 0)
            self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def result(self) -> Any:
        code = self.wait()
        assert code == 0, f"child exited with {code}"
        return json.loads(self.result_path.read_text())

    def kill(self) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.launched.pidfd, signal.SIGKILL)
            self.wait()


@contextlib.contextmanager
def python_child(code: str, tmp_path: Path) -> Iterator[Child]:
    """Run `code` (after PRELUDE) in /usr/bin/python3 under the axnet filter."""
    result = tmp_path / "result.json"
    launched = launch(
        [CHILD_PYTHON, "-I", "-c", PRELUDE + code, str(result)],
        env=None,
        program=build_filter(),
    )
    child = Child(launched, result)
    try:
        yield child
    finally:
        try:
            child.kill()
        finally:
            launched.notify.close()
            os.close(launched.pidfd)
