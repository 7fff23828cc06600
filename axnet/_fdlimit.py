"""How many fds axnet's long-lived processes may hold."""

from __future__ import annotations

import contextlib
import resource


def raise_fd_limit() -> None:
    """Raise this process's soft limit on open fds to its hard limit.

    The daemon holds an fd per attached app (its session) and per control
    client; the supervisor one per parked call and per cached thread handle.
    A soft limit of 1024, Debian's default, would cap a node at about a
    thousand apps.  Processes they start get the limits they were given
    (the supervisor raises its own only after the app is launched).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
