"""The daemon's lease file: read at start, written as apps come and go.

See ``axnet._leases`` for what a lease is and why it is kept.  The file lives
in the daemon's runtime directory (0700, ours); it is replaced whole by a
rename, so a daemon killed mid-write leaves the previous version, never half
of one.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ._leases import Lease, decode, encode
from ._wire import WireError

log = logging.getLogger("axnet.daemon")

LEASE_FILE = "leases"
#: Where a new version is written before it replaces the file (one writer:
#: the daemon that serves the runtime directory).
LEASE_TEMPORARY = ".leases.new"
#: Largest lease file read: MAX_LEASES leases of a few hundred bytes.
MAX_FILE_BYTES = 64 * 1024 * 1024


def lease_path(runtime: Path) -> Path:
    return runtime / LEASE_FILE


def process_started(pid: int) -> int | None:
    """When process *pid* started, in clock ticks since boot; None if it
    does not run (or is not ours to see)."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields
    # after its closing one are plain, the 22nd (starttime) 20th of them.
    fields = line[line.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def load(path: Path) -> list[Lease]:
    """The leases in *path* whose app still runs; none, with a warning, if
    the file is not one of ours."""
    try:
        # Never blocking: a FIFO planted there would hold the start forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as exc:
        # ELOOP: a symbolic link, which no daemon writes there.
        log.warning("leases not read path=%s reason=%s", path, exc)
        return []
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        os.close(fd)
        log.warning("leases ignored path=%s reason=not a regular file of ours", path)
        return []
    with open(fd, "rb") as f:
        try:
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            log.warning("leases not read path=%s reason=%s", path, exc)
            return []
    try:
        if len(data) > MAX_FILE_BYTES:
            raise WireError(f"larger than {MAX_FILE_BYTES} bytes")
        leases = decode(data)
    except WireError as exc:
        log.warning("leases ignored path=%s reason=%s", path, exc)
        return []
    return [
        lease for lease in leases if lease.started and process_started(lease.pid) == lease.started
    ]


def save(path: Path, leases: Sequence[Lease]) -> OSError | None:
    """Replace *path* with *leases*; what failed, if anything (the caller
    says so, and the next change tries again)."""
    temporary = path.with_name(LEASE_TEMPORARY)
    try:
        # Made afresh, never opened: a link or FIFO planted under that name
        # (in a directory that was open to others before it was made 0700)
        # is replaced, not written through or waited on.
        temporary.unlink(missing_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600)
        with open(fd, "wb") as f:
            f.write(encode(leases))
        os.replace(temporary, path)
    except OSError as exc:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        return exc
    return None
