"""Whether a port of the node's address is held outside axnet's claims.

Every daemon on a host walks the same listener pool, so another user's
daemon (or any program) may hold ports this one is about to hand out.  The
kernel would refuse the app's bind with EADDRINUSE; asking it first, with a
socket of our own, lets the daemon hand out a free port instead.

The probe sets no SO_REUSEADDR, so a port that connections still hold
(accepted on a listener the app has closed, or in TIME_WAIT) counts as
held too: those connections keep the name of the service they were made
to (see ServiceTable.retired_keys and Bindings.retired), which a new
service on the same port would take from them.
"""

from __future__ import annotations

import errno
import socket
from ipaddress import IPv4Address, IPv6Address


def port_taken(host: IPv4Address | IPv6Address, port: int) -> bool:
    """Whether binding *host*:*port* is refused as in use.  Any other
    failure (no fd for the probe, at the daemon's limit) says nothing about
    the port: False, and the app's own bind decides."""
    family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # EMFILE: unknown
            probe.bind((str(host), port))
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    return False


__all__ = ["port_taken"]
