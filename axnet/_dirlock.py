"""One daemon per runtime directory, for as long as it runs.

The daemon takes an exclusive ``flock`` on ``daemon.lock`` in its runtime
directory before it touches anything else there, and holds it until it exits
(the kernel drops it with the process, however that ends).  So:

* two daemons started at once cannot both serve the directory: the second is
  refused, where before each could take the other's half-made socket for a
  stale one and replace it;
* a daemon finding a control socket with no lock held knows it for a dead
  daemon's;
* a daemon whose directory was replaced while it ran (logind removes
  ``/run/user/UID`` at logout; a new daemon then makes it afresh) sees that
  the lock file at the path is no longer the one it holds, and leaves the
  files there, the new daemon's, alone when it stops.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from ._control import ControlError

LOCK_FILE = "daemon.lock"


class DirLock:
    """The held lock on a runtime directory (see the module's text)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        info = os.fstat(fd)
        self._identity = (info.st_dev, info.st_ino)

    @classmethod
    def acquire(cls, runtime: Path) -> DirLock:
        """Lock *runtime* (already prepared: ours, 0700) or say who holds it."""
        path = runtime / LOCK_FILE
        try:
            # No link followed, nothing blocking: what another user planted
            # in a directory that was open to them is refused, not used.
            fd = os.open(
                path,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                0o600,
            )
        except OSError as exc:
            why = "it is a symbolic link; remove it" if exc.errno == errno.ELOOP else exc.strerror
            raise ControlError(
                f"cannot lock runtime directory {runtime}: {path}: {why}; "
                "or choose another directory with --runtime-dir",
                err=exc.errno or 0,
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                raise ControlError(
                    f"cannot lock runtime directory {runtime}: {path} is not a file of "
                    "yours; remove it, or choose another directory with --runtime-dir"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ControlError(
                    f"another axnet daemon runs on {runtime} (it holds {path}); "
                    "stop it with 'axnet stop', or choose another --runtime-dir",
                    err=errno.EBUSY,
                ) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def still_ours(self) -> bool:
        """Whether the lock file at the path is still the one held: False
        once the directory was removed or replaced."""
        try:
            info = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self._identity

    def release(self) -> None:
        """Let go (the file stays: removing it would let a second daemon lock
        a new file while a third still waits on the old one)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
