"""The binds the engine makes itself: an app's inet stream socket bound to its
virtual address, to a port of its client block, or as an inert wildcard.

Theory of operation
-------------------
The engine decides a bind (``axnet._verdict.decide_bind``); what it decides
to make virtual or inert is made here, and recorded in ``_bindings``.  A
virtual bind claims the address from the node and binds the socket for real
to the node's address at the port the node grants; an any-port bind takes a
port of the app's client block first, the same port real and virtual, so
that servers name the app the same whether it bound before connecting or
not.  An inert bind is a wildcard of the family the app has no address in,
bound on loopback and never published.  A second socket on an address the
app holds already is bound beside the others on the same real port, where
the kernel decides as it would on the virtual address.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import logging
import os
import random
import socket
from collections.abc import Sequence
from typing import Protocol

from .._node import ClaimError
from .._table import IPAddress, VirtualAddress, ip_address
from .._verdict import Identity
from . import _raw
from ._bindings import LOOPBACK4, LOOPBACK6, Binding, Bindings, BoundSocket
from ._decode import inet_endpoint, pack_inet
from ._source import IP_LOCAL_PORT_RANGE, port_range
from ._tasks import Errno

log = logging.getLogger("axnet.run")

WILDCARD4, WILDCARD6 = ip_address("0.0.0.0"), ip_address("::")
_AF_INET = int(socket.AF_INET)
_AF_INET6 = int(socket.AF_INET6)


class NodeLink(Protocol):
    """How the engine claims virtual ports from the node (the supervisor implements it)."""

    def claim(
        self, virtual: VirtualAddress, avoid: Sequence[int], real_port: int = 0
    ) -> tuple[int, int]:
        """Return (real port, virtual port); real port 0 means "let the kernel
        pick".  A *real_port* given asks for that one (the node may not grant it)."""
        ...

    def listen(self, virtual: VirtualAddress) -> None: ...
    def release(self, virtual: VirtualAddress) -> None: ...
    def more_ports(self) -> tuple[int, int] | None:
        """Another client port block, which the identity now holds; None if none."""
        ...

    def use_block(self, block: tuple[int, int]) -> None:
        """Make *block*, one of the identity's blocks, the one connects use now."""
        ...


class Binder:
    """Makes the virtual and inert binds of one app, and records them in its *bindings*."""

    def __init__(self, bindings: Bindings, node: NodeLink) -> None:
        self.bindings = bindings
        self.node = node
        #: The identity whose blocks were all full when the daemon had no
        #: more to give: not asked again at every bind (a round trip).
        self._no_more_ports: Identity | None = None

    def bind_virtual(self, sock: _socket.socket, port: int, pid: int, me: Identity) -> Binding:
        """Claim ``vip:port`` of *me* (the app's identity) and bind the socket
        to a real port; raises Errno."""
        if local_endpoint(sock)[1] != 0:
            raise Errno(errno.EINVAL)  # already bound, as the kernel says
        if sock.family == _AF_INET and me.real_host.version == 6:
            # Its real socket would be bound on the node's IPv6 address,
            # which an IPv4 socket cannot hold: as an address not here.
            log.warning(
                "bind refused addr=%s:%d reason=an IPv4 socket cannot be bound on this "
                "node's IPv6 address %s; give the app an IPv6 --ip, or bind an IPv6 socket",
                me.vip,
                port,
                me.real_host,
            )
            raise Errno(errno.EADDRNOTAVAIL)
        virtual = VirtualAddress(ip=me.vip, port=port)
        if sock.family == _AF_INET6 and me.vip.version == 6 and me.real_host.version == 4:
            # An IPv6 virtual address on a node with an IPv4 address: the real
            # socket is bound v4-mapped, which an IPv6-only socket refuses
            # (EINVAL).  Only axnet's redirects reach that port, so it may
            # take IPv4 too; getsockopt(IPV6_V6ONLY) then reads 0.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if port:
            group = self.bindings.live(virtual)
            if group is not None:
                # Ours: a second socket on it only as the kernel allows one.
                return self._join(group, sock, me.real_host, pid)
        elif me.block is not None:
            in_block = self._bind_in_block(sock, me, pid)
            if in_block is not None:
                return in_block
        avoid: list[int] = []
        for _ in range(8):
            try:
                real_port, vport = self.node.claim(virtual, avoid)
            except ClaimError as exc:
                log.info("bind refused addr=%s reason=%s", virtual, exc)
                raise Errno(exc.errno) from None
            claimed = VirtualAddress(ip=me.vip, port=vport)
            err = _raw.bind(sock.fileno(), pack(sock.family, me.real_host, real_port))
            if err == 0:
                if real_port == 0:
                    real_port = local_endpoint(sock)[1]
                    if vport == 0:
                        claimed = VirtualAddress(ip=me.vip, port=real_port)
                return self._bound(sock, claimed, real_port, pid)
            self.node.release(claimed)
            if err != errno.EADDRINUSE:
                raise Errno(err)
            avoid.append(real_port)  # taken by a process outside axnet
        log.warning(
            "bind refused addr=%s reason=real ports %s of the pool are held outside axnet",
            virtual,
            ",".join(map(str, avoid)),
        )
        raise Errno(errno.EADDRINUSE)

    def _bind_in_block(self, sock: _socket.socket, me: Identity, pid: int) -> Binding | None:
        """Bind an any-port bind to a port of the app's client blocks, the same
        port real and virtual.  Servers name a client by its block, so one
        that binds its own address before it connects (``curl --interface``,
        a ``source_address``, nginx's ``proxy_bind``) is seen from its
        virtual IP, as any connect of it is.  The kernel finds a free port
        (ports in TIME_WAIT are not, for a socket without SO_REUSEADDR);
        when the current block has none, another the app holds, then one more
        from the daemon, as connects do.  None when no port could be had:
        then the pool."""
        for candidate in dict.fromkeys((me.block, *me.blocks)):
            if candidate is None:
                continue
            found = self._bind_in(sock, me, candidate, pid)
            if found is not None:
                if candidate != me.block:
                    self.node.use_block(candidate)  # connects go there too, as theirs would
                return found
        if me is self._no_more_ports:
            return None
        more = self.node.more_ports()  # every block of the app is full: now the app's
        if more is None:
            self._no_more_ports = me
            return None
        return self._bind_in(sock, me, more, pid)

    def _bind_in(
        self,
        sock: _socket.socket,
        me: Identity,
        block: tuple[int, int],
        pid: int,
    ) -> Binding | None:
        """_bind_in_block within one *block*; None when it has no free port."""
        for _ in range(8):
            port = _free_port(sock, me.real_host, block)
            if port is None:
                return None
            virtual = VirtualAddress(ip=me.vip, port=port)
            try:
                real_port, vport = self.node.claim(virtual, (), real_port=port)
            except ClaimError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue  # ours, or another app's on the same virtual IP
                raise Errno(exc.errno) from None
            if real_port not in (0, port) or vport != port:
                self.node.release(VirtualAddress(ip=me.vip, port=vport))
                return None  # a node that does not grant real ports
            err = _raw.bind(sock.fileno(), pack(sock.family, me.real_host, port))
            if err == 0:
                return self._bound(sock, virtual, port, pid)
            self.node.release(virtual)
            if err != errno.EADDRINUSE:
                raise Errno(err)
            # Taken since the probe: the kernel finds another.
        return None

    def _bound(
        self,
        sock: _socket.socket,
        virtual: VirtualAddress,
        real_port: int,
        pid: int,
    ) -> Binding:
        """Record *sock*, bound for real to *real_port*, as the app's binding of
        *virtual* (an inert one when that is a wildcard)."""
        binding = Binding(
            virtual=virtual,
            real_port=real_port,
            sockets=[BoundSocket(inode=os.fstat(sock.fileno()).st_ino, pid=pid)],
            host=local_endpoint(sock)[0],
        )
        self.bindings.add(binding)
        log.debug("bind virtual=%s real_port=%s", virtual, real_port)
        return binding

    def bind_node_port(self, sock: _socket.socket, me: Identity) -> None:
        """Bind to any port of the node's own address: a free one of the app's
        client blocks, where servers name its connections by its virtual IP
        (see `axnet._verdict.BindNodePort`); with all of them full, one of
        the node's spill ports, in no app's block (from a daemon that names
        none, any port).  Raises Errno."""
        if local_endpoint(sock)[1] != 0:
            raise Errno(errno.EINVAL)  # already bound, as the kernel says
        ranges = [b for b in dict.fromkeys((me.block, *me.blocks, me.spill)) if b is not None]
        for candidate in ranges:
            for _ in range(8):
                port = _free_port(sock, me.real_host, candidate)
                if port is None:
                    break
                err = _raw.bind(sock.fileno(), pack(sock.family, me.real_host, port))
                if err == 0:
                    return
                if err != errno.EADDRINUSE:
                    raise Errno(err)
                # Taken since the probe: the kernel finds another.
        if me.spill is None:
            err = _raw.bind(sock.fileno(), pack(sock.family, me.real_host, 0))
            if err:
                raise Errno(err)
            return
        log.info("bind refused addr=%s:0 reason=no port of the app's free", me.real_host)
        raise Errno(errno.EADDRINUSE)  # as the kernel's bind finds no port

    def bind_inert(self, sock: _socket.socket, port: int, pid: int) -> Binding:
        """Bind a wildcard of the family the app has no address in: to
        loopback, at a port the kernel picks, shown as the wildcard and *port*
        (the kernel's port when *port* is 0).  Raises Errno."""
        if local_endpoint(sock)[1] != 0:
            raise Errno(errno.EINVAL)
        v6 = sock.family == _AF_INET6
        virtual = VirtualAddress(ip=WILDCARD6 if v6 else WILDCARD4, port=port)
        loopback = LOOPBACK6 if v6 else LOOPBACK4
        if port:
            group = self.bindings.live(virtual)
            if group is not None:
                return self._join(group, sock, loopback, pid)
        err = _raw.bind(sock.fileno(), pack(sock.family, loopback, 0))
        if err:  # EADDRNOTAVAIL with IPv6 switched off: then there is no such address
            raise Errno(err)
        real_port = local_endpoint(sock)[1]
        shown = VirtualAddress(ip=virtual.ip, port=port or real_port)
        return self._bound(sock, shown, real_port, pid)

    def _join(self, group: Binding, sock: _socket.socket, host: IPAddress, pid: int) -> Binding:
        """Bind *sock* beside the live sockets of *group*, all on its one
        real port, if the kernel allows it there: it decides as it would on
        the virtual address (SO_REUSEPORT on all of them, set before or
        after their binds, as nginx sets it at a reload; SO_REUSEADDR on
        sockets not listening; the same user), or the address is in use."""
        err = _raw.bind(sock.fileno(), pack(sock.family, host, group.real_port))
        if err == errno.EADDRINUSE:
            log.info("bind refused addr=%s reason=in use by this app", group.virtual)
        if err:
            raise Errno(err)
        self.bindings.join(group, os.fstat(sock.fileno()).st_ino, pid)
        log.debug("bind joined virtual=%s sockets=%d", group.virtual, len(group.sockets))
        return group


def _free_port(sock: _socket.socket, host: IPAddress, block: tuple[int, int]) -> int | None:
    """A port of *block* at *host* that *sock* could bind now, as the kernel
    finds one for a bind to port 0 (``IP_LOCAL_PORT_RANGE``, Linux 6.3) on a
    probe socket like it (same family, same SO_REUSEADDR); None when none is
    free.  The kernel's search costs a system call where claiming port
    after port from the daemon cost a round trip each.  Without
    IP_LOCAL_PORT_RANGE, a port of the block at random.  What is not a full
    block takes no new one: a failed bind raises Errno, and no fd free
    OSError (the engine makes room)."""
    probe = socket.socket(sock.family, socket.SOCK_STREAM)
    try:
        reuseaddr = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuseaddr)
        if sock.family == _AF_INET6:
            with contextlib.suppress(OSError):
                v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        try:
            probe.setsockopt(socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, port_range(block))
        except OSError:  # before Linux 6.3: a port at random, for the claim and bind to try
            return block[0] + random.randrange(block[1] - block[0] + 1)
        err = _raw.bind(probe.fileno(), pack(sock.family, host, 0))
        if err == errno.EADDRINUSE:
            return None
        if err:
            raise Errno(err)
        port = local_endpoint(probe)[1]
        return port if block[0] <= port <= block[1] else None
    finally:
        probe.close()


def fits(family: int, ip: IPAddress) -> bool:
    """Whether a socket of *family* can hold *ip* (IPv6 holds IPv4 mapped)."""
    return family == socket.AF_INET6 or ip.version == 4


def pack(family: int, ip: IPAddress, port: int) -> bytes:
    """*ip*:*port* as a sockaddr of *family*; ENETUNREACH when the family
    cannot hold the address (an IPv4 socket, an IPv6 address)."""
    try:
        return pack_inet(family, ip, port)
    except ValueError:
        raise Errno(errno.ENETUNREACH) from None


def local_endpoint(sock: _socket.socket) -> tuple[IPAddress, int]:
    """Where *sock*, an inet socket, is bound (port 0: not yet)."""
    endpoint = inet_endpoint(_raw.getsockname(sock.fileno()))
    assert endpoint is not None  # only called on inet sockets
    return endpoint
