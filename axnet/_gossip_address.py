"""Gossip addresses (pure): how members' addresses are written and read.

Members advertise IP addresses; a host given on the command line (``--bind``,
``--join``, a seed) may be a name, resolved later, outside this module.
"""

from __future__ import annotations

import functools
import ipaddress

import swim

#: Gossip port when none is given (Serf's and memberlist's).
DEFAULT_PORT = 7946


@functools.lru_cache(maxsize=4096)
def ip_literal(host: str) -> bool:
    """Whether *host* is an IP address, not a name (members advertise IPs)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_address(text: str, *, flag: str, default_port: int = DEFAULT_PORT) -> swim.Address:
    """``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT`` → (host, port).

    HOST may be a name; it is resolved later.  Raises ValueError with the
    message for the user.
    """
    raw = text.strip()
    port_text: str | None = None
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{flag} must be HOST[:PORT], got {text!r}")
        port_text = rest[1:] if rest else None
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    else:
        host = raw  # an IPv4 address, a name, or a bare IPv6 address
        if ":" in host and not ip_literal(host):
            raise ValueError(f"{flag} must be HOST[:PORT], got {text!r}")
    if not host:
        raise ValueError(f"{flag} must be HOST[:PORT], got {text!r}")
    if port_text is None:
        return (host, default_port)
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{flag} must be HOST[:PORT], got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{flag} port must be 0 to 65535, got {port}")
    return (host, port)


def host_port(address: swim.Address) -> str:
    """*address* as logs and ``axnet members`` show it: ``host:port``, ``[v6]:port``."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["DEFAULT_PORT", "host_port", "ip_literal", "parse_address"]
