"""The daemon's lease file: read at start, written as apps come and go.

See ``axnet._leases`` for what a lease is and why it is kept.  The file lives
in the daemon's runtime directory (0700, ours); it is replaced whole by a
rename, so a daemon killed mid-write leaves the previous version, never half
of one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ._leases import Lease, decode, encode
from ._wire import WireError

log = logging.getLogger("axnet.daemon")

LEASE_FILE = "leases"
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
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields
    # after its closing one are plain, the 22nd (starttime) 20th of them.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def load(path: Path) -> list[Lease]:
    """The leases in *path* whose app still runs; none, with a warning, if
    the file is not one of ours."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return []
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


def save(path: Path, leases: Sequence[Lease]) -> None:
    """Replace *path* with *leases*; a failure is logged, and the next
    change tries again."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as f:
            f.write(encode(leases))
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("leases not written path=%s reason=%s", path, exc)
        temporary.unlink(missing_ok=True)
