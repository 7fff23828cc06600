"""Path sockets resolved as the app resolves them.

A bind or connect of an ``AF_UNIX`` socket to a path looks the path up in
the calling thread's working directory and creates the socket file under
its umask.  The engine makes those calls for the app (never with CONTINUE:
the app could change the address after the decision), so it makes them as
the app would: the engine thread has its own working directory and umask
(``unshare(CLONE_FS)``), and for the length of one call it takes the app
thread's (``/proc/TID/cwd``, the ``Umask`` of ``/proc/TID/status``).

What still differs from the app's own call: the peer credentials
(``SO_PEERCRED``) name the supervisor's process, not the app's (same user).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator

from ._libc import unshare_fs

log = logging.getLogger("axnet.run")


def is_path_address(raw: bytes) -> bool:
    """Whether *raw* is an ``AF_UNIX`` sockaddr naming a filesystem path."""
    return len(raw) > 2 and int.from_bytes(raw[:2], "little") == socket.AF_UNIX and raw[2] != 0


def app_umask(status: bytes) -> int | None:
    """The ``Umask`` field of ``/proc/TID/status`` text, or None."""
    for line in status.splitlines():
        if line.startswith(b"Umask:"):
            try:
                return int(line.split()[1], 8)
            except (IndexError, ValueError):
                return None
    return None


class AppFs:
    """The engine thread's way into its app threads' directories.  Create it
    in the thread that makes the calls."""

    def __init__(self) -> None:
        self._home = -1
        try:
            self._home = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            unshare_fs()
        except OSError as exc:  # then paths resolve from the supervisor's directory
            log.warning("path sockets resolve from the supervisor's directory: %s", exc)
            self.close()

    @contextlib.contextmanager
    def like(self, tid: int, still_valid: Callable[[], None]) -> Iterator[None]:
        """Within: the working directory and umask of thread *tid*.

        *still_valid* raises unless the notification is still pending: then
        the handles were opened on the app's thread, not on a task that got
        its id after it was gone.  OSError when they cannot be opened.
        """
        if self._home < 0:
            yield
            return
        cwd = os.open(f"/proc/{tid}/cwd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with open(f"/proc/{tid}/status", "rb") as status:
                umask = app_umask(status.read())
            still_valid()
            os.fchdir(cwd)
            old = os.umask(umask) if umask is not None else None
            try:
                yield
            finally:
                if old is not None:
                    os.umask(old)
                try:
                    os.fchdir(self._home)
                except OSError as exc:  # the call itself is done: its answer stands
                    log.warning("engine could not return to its directory: %s", exc)
        finally:
            os.close(cwd)

    def close(self) -> None:
        if self._home >= 0:
            os.close(self._home)
            self._home = -1
