"""Whether a port of the node's address is held outside axnet.

Every daemon on a host walks the same listener pool, so another user's
daemon (or any program) may hold ports this one is about to hand out.  The
kernel would refuse the app's bind with EADDRINUSE; asking it first, with a
socket of our own, lets the daemon hand out a free port instead.
"""

from __future__ import annotations

import errno
import socket
from ipaddress import IPv4Address, IPv6Address


def port_taken(host: IPv4Address | IPv6Address, port: int) -> bool:
    """Whether binding *host*:*port* (with SO_REUSEADDR, as servers do) is
    refused as in use.  Any other failure says nothing about the port:
    False, and the app's own bind decides."""
    family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((str(host), port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


__all__ = ["port_taken"]
