"""One daemon per runtime directory, for as long as it runs.

The daemon takes an exclusive ``flock`` on its runtime directory itself (an
fd of the directory, no file in it) before it touches anything there, and
holds it until it exits (the kernel drops it with the process, however that
ends).  So:

* two daemons started at once cannot both serve the directory: the second is
  refused, where before each could take the other's half-made socket for a
  stale one and replace it;
* a daemon finding a control socket with the directory unlocked knows it for
  a dead daemon's;
* a daemon whose directory was replaced while it ran (logind removes
  ``/run/user/UID`` at logout; a new daemon then makes it afresh) sees that
  the directory at the path is no longer the one it locked, and leaves the
  files there, the new daemon's, alone when it stops;
* systemd-tmpfiles, which ages files in ``/tmp`` (the fallback directory),
  skips a directory that is locked so.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ._control import ControlError, command_for


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
        try:
            fd = os.open(runtime, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ControlError(
                f"cannot lock runtime directory {runtime}: {exc.strerror}; "
                "choose another directory with --runtime-dir",
                err=exc.errno or 0,
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            stop = command_for("axnet stop", runtime)
            raise ControlError(
                f"another axnet daemon runs on {runtime} (it holds a lock on it); "
                f"stop it with '{stop}', or choose another --runtime-dir",
                err=errno.EBUSY,
            ) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(runtime, fd)

    def still_ours(self) -> bool:
        """Whether the directory at the path is still the one locked: False
        once it was removed or replaced."""
        try:
            info = os.stat(self.path)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self._identity

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
