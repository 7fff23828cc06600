"""What a node's apps hold, kept across a daemon restart (pure).

Theory of operation
-------------------
Apps outlive their daemon: when it dies or is restarted, their supervisors
re-attach to the next one within RECONNECT_MAX_S and hand back what they held
(see ``Node.attach`` and ``Node.adopt``).  Until one has, the new daemon knew
nothing of it, and an app started meanwhile could be given its client port
block (servers then named the old app's connections after the newcomer), its
automatic virtual IP, or its listening address.

So the daemon keeps a *lease* per app in its runtime directory: the app's id,
its process (pid and start time, so that a reused pid is not taken for it), its
virtual IP, its blocks and its bindings.  A new daemon reads the file, keeps the
leases whose process still runs, and holds what they name for their apps until
each re-attaches or the table has settled (``Node.reserve``).

This module encodes and decodes the file; the daemon reads and writes it.
A file that does not decode is ignored whole: it only ever narrows what a
newcomer is given, never what a re-attaching app gets back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from ._table import IPAddress, VirtualAddress
from ._wire import (
    WireError,
    block_from_wire,
    int_from_wire,
    ip_from_wire,
    pack,
    port_from_wire,
    text_from_wire,
    unpack,
)

#: The file's format; another is ignored (a newer daemon's, say).
FORMAT = 1
#: Leases a file may hold, and blocks and bindings a lease may name: as many
#: as there are ports (the decoder's object bound keeps junk small anyway).
MAX_LEASES = 65_536
MAX_ITEMS = 65_536


@attrs.frozen(kw_only=True)
class Binding:
    """A virtual address an app has bound, and the real port behind it."""

    virtual: VirtualAddress
    real_port: int


@attrs.frozen(kw_only=True)
class Lease:
    app_id: str
    #: The app's process and its start time in clock ticks since boot
    #: (``/proc/PID/stat``'s 22nd field): together they name one process.
    pid: int
    started: int
    vip: IPAddress
    blocks: tuple[tuple[int, int], ...] = ()
    bindings: tuple[Binding, ...] = ()


def encode(leases: Sequence[Lease]) -> bytes:
    texts: dict[IPAddress, str] = {}  # an app's bindings mostly share one address

    def text(ip: IPAddress) -> str:
        found = texts.get(ip)
        if found is None:
            found = texts[ip] = str(ip)
        return found

    return pack(
        {
            "format": FORMAT,
            "leases": [
                [
                    lease.app_id,
                    lease.pid,
                    lease.started,
                    str(lease.vip),
                    [list(b) for b in lease.blocks],
                    [[text(b.virtual.ip), b.virtual.port, b.real_port] for b in lease.bindings],
                ]
                for lease in leases
            ],
        }
    )


def _items(value: object, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise WireError(f"{what}: expected a list of at most {MAX_ITEMS}")
    return value


def _lease(value: object) -> Lease:
    if not isinstance(value, list) or len(value) != 6:
        raise WireError("a lease is [app_id, pid, started, vip, blocks, bindings]")
    app_id, pid, started, vip, blocks, bindings = value
    bound = []
    for item in _items(bindings, "bindings"):
        if not isinstance(item, list) or len(item) != 3:
            raise WireError("a binding is [ip, port, real_port]")
        ip, port, real_port = item
        virtual = VirtualAddress(ip=ip_from_wire(ip), port=port_from_wire(port))
        bound.append(Binding(virtual=virtual, real_port=port_from_wire(real_port)))
    return Lease(
        app_id=text_from_wire(app_id, "app id"),
        pid=int_from_wire(pid),
        started=int_from_wire(started),
        vip=ip_from_wire(vip),
        blocks=tuple(block_from_wire(b) for b in _items(blocks, "blocks")),
        bindings=tuple(bound),
    )


def decode(data: bytes) -> list[Lease]:
    """The leases in *data*; WireError when it is not a lease file of ours."""
    content = unpack(data)
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise WireError(f"not a lease file of format {FORMAT}")
    leases = content.get("leases")
    if not isinstance(leases, list) or len(leases) > MAX_LEASES:
        raise WireError(f"leases: expected a list of at most {MAX_LEASES}")
    return [_lease(item) for item in leases]
