"""Where the app's connections to virtual services leave from.

Theory of operation
-------------------
Servers look a client up by its source address and port: the node's
address, and a port in the app's client block, name the app (and its
virtual IP).  So a redirected connect is pinned to the block
(``IP_LOCAL_PORT_RANGE``, Linux 6.3: the kernel still picks the port, among
those of the block) and, when the kernel would send it from another address
of the node, bound to the node's address without a port
(``IP_BIND_ADDRESS_NO_PORT``, which leaves the port to the connect).  Which
routes need that is learnt once per destination and forgotten at every
sweep, for routes that change; the fast path (``_fastpath.c``) shares what
is learnt.  When the block is exhausted, a connect takes a free port of
another block the app holds (its closed connections gave them back), and
connects use that block from then on; only when every one is exhausted
does the engine ask the daemon for another, and when it has none to give,
connections leave from the node's spill ports, which lie in no app's block
(the top of its client ports, ``NodeConfig.spill_ports``): the server then
sees the node's address, not the app's.  So do those of an app the node had
no block for.  Not from any port: one in another app's block would have
servers name the connection after that app.
"""

from __future__ import annotations

import _socket
import errno
import logging
import socket
import struct

from .._table import IPAddress, ip_address, packed_ip
from .._verdict import Identity
from . import _raw
from ._decode import pack_inet
from ._tasks import Errno

log = logging.getLogger("axnet.run")

#: setsockopt(IPPROTO_IP, IP_LOCAL_PORT_RANGE): lo | hi << 16 (Linux 6.3).
IP_LOCAL_PORT_RANGE = 51
#: setsockopt(IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT): bind the address, leave
#: the port to connect (which can share it among destinations).
IP_BIND_ADDRESS_NO_PORT = 24

_UINT32 = struct.Struct("=I")


class ClientSource:
    """The source address and ports of one app's connections to virtual services."""

    def __init__(self) -> None:
        #: (node address, destination), packed: whether a connection there
        #: must be bound to the node's address (see bind_address).  Shared
        #: with the fast path; emptied at every sweep, for routes that change.
        self.routes: dict[bytes, bool] = {}
        self._block: tuple[int, int] | None = None
        self._block_value = b""
        #: The blocks held when the spill ports were last warned of.
        self._blocks_warned: frozenset[tuple[int, int]] = frozenset()

    def forget_routes(self) -> None:
        """Forget which routes leave from another address (routes change)."""
        self.routes.clear()

    def bind_address(self, sock: _socket.socket, dest: IPAddress, me: IPAddress) -> None:
        """Make a connection to a virtual service leave from the node's
        address, where servers look the app's client block up, when the
        kernel would pick another: a second loopback address (127.0.0.2
        sends from 127.0.0.1), another interface's.  Bound without a port:
        the connect still picks one in the block.  A socket the app bound
        already keeps its address (EINVAL)."""
        if me.version != dest.version:
            return
        key = packed_ip(me) + packed_ip(dest)
        differs = self.routes.get(key)
        if differs is None:
            try:
                differs = self.routes[key] = _route_source(dest) != me
            except OSError:  # no fd for the probe (EMFILE): the kernel's pick, this once
                return
        if not differs:
            return
        try:
            address = pack_inet(sock.family, me, 0)
        except ValueError:
            return  # an IPv4 socket on an IPv6 node: the route decides
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        err = _raw.bind(sock.fileno(), address)
        if err not in (0, errno.EINVAL):
            raise Errno(err)

    def pin_ports(self, sock: _socket.socket, block: tuple[int, int] | None) -> bool:
        """Keep the source port in *block*, one of the app's client port
        blocks, so servers can name the client."""
        if block is None:
            return False
        if self._block != block:
            self._block = block
            self._block_value = port_range(block)
        return _set_port_range(sock, self._block_value)

    def spill_ports(self, sock: _socket.socket, me: Identity) -> None:
        """Keep the source port in the node's spill ports, which lie in no
        app's block (any port, from a daemon that names none): the app has
        no free port in a block of its own, every one used up (warned of
        once a current block) or none given it."""
        # Once while the app holds these blocks, not at every connect (nor
        # as its connects move among them): again after it gains one.
        if me.block is not None and not self._blocks_warned >= set(me.blocks):
            self._blocks_warned = frozenset(me.blocks)
            log.warning(
                "client port blocks %s have no free port (held by this app's connections, "
                "or bound by other processes); connecting from the node's ports %s "
                "while they have none (the server sees the node's address, not the app's)",
                ", ".join(f"{lo}-{hi}" for lo, hi in me.blocks),
                f"{me.spill[0]}-{me.spill[1]}" if me.spill else "(any)",
            )
        _set_port_range(sock, port_range(me.spill))


def port_range(ports: tuple[int, int] | None) -> bytes:
    """IP_LOCAL_PORT_RANGE's value for *ports* (none: the kernel's whole range)."""
    return _UINT32.pack(ports[0] | ports[1] << 16 if ports else 0)


def _set_port_range(sock: _socket.socket, value: bytes) -> bool:
    """Whether the kernel took it (Linux 6.3)."""
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, value)
    except OSError as exc:
        log.debug("IP_LOCAL_PORT_RANGE unavailable: %s", exc)
        return False
    return True


def pinned(sock: _socket.socket) -> bool:
    """Whether the socket's source port was kept in a client block
    (``IP_LOCAL_PORT_RANGE``, set by a redirected connect).  A connect to a
    real address takes its port from the kernel's whole range, where the
    blocks lie too: such a port is the node's, whatever block it falls in."""
    try:
        return sock.getsockopt(socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE) != 0
    except OSError:
        return False


def _route_source(dest: IPAddress) -> IPAddress | None:
    """The address the kernel would send a connection to *dest* from; None
    when it has no route (the connect will say why)."""
    family = socket.AF_INET if dest.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as probe:  # OSError: no socket to be had
        try:
            probe.connect((str(dest), 9))  # any port: nothing is sent
            return ip_address(probe.getsockname()[0])
        except (OSError, ValueError):  # ValueError: a scoped (link-local) source
            return None
