"""What an app has bound: its addresses, the sockets behind each, and the
connections kept for its listeners.

Theory of operation
-------------------
A *binding* is an address the app bound and the real port its sockets are
bound to: the app's virtual address (claimed from the node, published when a
socket of it listens), or an *inert* wildcard of the family the app has no
address in (bound on loopback, never published).  Usually one socket holds
it; several do when each was bound with SO_REUSEPORT, as the kernel allows,
and the binding lasts until the last of them closes.

``close`` is not trapped.  A sweep finds the sockets the app closed: gone
from the kernel's list of listeners (or never in it: only bound), and from
the fd tables of the app's processes, each table read once per sweep.

A connection axnet accepted that the app could not take (no fd free, the
thread gone) is *kept* for the next accept on its listener.  It is off the
kernel's queue, so a doorbell connection of our own keeps the listener
readable meanwhile, for servers that accept only when epoll says so.

The engine thread changes all of this.  The supervisor's thread reads
``snapshot()`` under the lock; the fast path (``_fastpath.c``) reads
``names``, ``inert_names``, ``serving``, ``retired`` and ``kept`` in the
engine thread.
"""

from __future__ import annotations

import _socket
import collections
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable

import attrs

from .._table import IPAddress, VirtualAddress, endpoint, ip_address, retire, unpack_endpoint
from . import _sockdiag
from ._decode import inet_endpoint
from ._tasks import NO_FD

log = logging.getLogger("axnet.run")

LOOPBACK4, LOOPBACK6 = ip_address("127.0.0.1"), ip_address("::1")
#: How long ringing a listener may wait for its (local) handshake, in seconds.
BELL_WAIT_S = 0.05


@attrs.define
class BoundSocket:
    """One socket of the app bound to a virtual address."""

    inode: int
    #: A thread of the process that bound it, to find the socket in its fd table.
    pid: int = 0
    listening: bool = False


@attrs.define
class Binding:
    """An address the app has bound: ``virtual``, held by sockets bound for real
    to ``real_port``.  One socket, or several when each was bound with
    SO_REUSEPORT (the kernel then spreads the connections between them).

    The app's own virtual address is claimed from the node and published when
    a socket listens.  An *inert* binding (``virtual.ip`` a wildcard) is a
    wildcard of the family the app has no address in: bound to loopback, not
    claimed, never published."""

    virtual: VirtualAddress
    real_port: int
    sockets: list[BoundSocket]
    #: The real address its sockets are bound to, as read from the first:
    #: the node's address when it was bound (loopback for an inert one),
    #: which a daemon restarted at another address does not move.
    host: IPAddress
    #: Published: a socket of it listens (stays so until it is released).
    listening: bool = False

    @property
    def inert(self) -> bool:
        return self.virtual.ip.is_unspecified


class Bindings:
    """The app's bindings by real port, with the indexes the hot path reads."""

    def __init__(self, release: Callable[[VirtualAddress], None]) -> None:
        #: Bindings of the app's virtual address, by real port (on the node's
        #: address), and inert ones, by real port (on loopback).
        self.virtual: dict[int, Binding] = {}
        self.inert: dict[int, Binding] = {}
        #: Real port -> packed address shown for it (the fast path's view).
        self.names: dict[int, bytes] = {}
        self.inert_names: dict[int, bytes] = {}
        #: Real port -> packed address, of the bindings that listen: the
        #: connections accepted there name their clients virtually.
        self.serving: dict[int, bytes] = {}
        #: Socket inode -> packed address of the listener that accepted it,
        #: for connections of listeners the app has closed: they keep that
        #: name, as the kernel's keep theirs.  The newest MAX_RETIRED.
        self.retired: dict[int, bytes] = {}
        #: Connections kept for a listener, by its real port.
        self.kept: dict[int, Kept] = {}
        self._by_address: dict[VirtualAddress, Binding] = {}
        self._lock = threading.Lock()
        self._release = release

    def add(self, binding: Binding) -> None:
        with self._lock:
            table, names = (
                (self.inert, self.inert_names) if binding.inert else (self.virtual, self.names)
            )
            table[binding.real_port] = binding
            names[binding.real_port] = endpoint(binding.virtual.ip, binding.virtual.port)
            self._by_address[binding.virtual] = binding

    def join(self, binding: Binding, inode: int, pid: int) -> None:
        """One more socket (*inode*, bound by thread *pid*) holds *binding*."""
        with self._lock:
            binding.sockets.append(BoundSocket(inode=inode, pid=pid))

    def serve(self, binding: Binding) -> None:
        """A socket of *binding* (of the app's virtual address) listens."""
        with self._lock:
            binding.listening = True
            self.serving[binding.real_port] = endpoint(binding.virtual.ip, binding.virtual.port)

    def accepted(self, inode: int, real_port: int) -> bool:
        """Whether socket *inode*, at *real_port* of the node's address, is
        a connection accepted on a listener of the app: one that listens
        there, or one it has closed since."""
        return real_port in self.serving or inode in self.retired

    def _retire(self, binding: Binding, name: bytes) -> None:
        """Keep *name* for the connections the released *binding* accepted
        (asked of the kernel: best effort, none when it cannot say)."""
        if not binding.listening:
            return
        try:
            inodes = _sockdiag.connection_inodes(binding.real_port)
        except OSError:
            return
        for inode in inodes:
            retire(self.retired, inode, name)

    def retired_name(self, inode: int) -> VirtualAddress | None:
        """The address of the closed listener that accepted the connection
        of socket *inode*, if any."""
        name = self.retired.get(inode)
        return None if name is None else unpack_endpoint(name)

    def at(self, real_port: int) -> Binding | None:
        """The binding of the app's virtual address at *real_port* on the node's address."""
        return self.virtual.get(real_port)

    def inert_at(self, ip: IPAddress, real_port: int) -> Binding | None:
        """The inert binding at real ``ip:real_port``, if it is one."""
        binding = self.inert.get(real_port) if self.inert else None
        if binding is None or ip != (LOOPBACK6 if binding.virtual.ip.version == 6 else LOOPBACK4):
            return None
        return binding

    def live(self, address: VirtualAddress) -> Binding | None:
        """The binding of *address*, unless every socket of it is closed: then
        it is released here and now.  A server that closes its listener and
        binds the same port again (iperf3 does, between tests) would otherwise
        find its own stale binding until the next sweep."""
        binding = self._by_address.get(address)
        if binding is None:
            return None
        listening = _sockdiag.listening_inodes((binding.real_port, binding.real_port))
        if len(closed(binding.sockets, listening)) < len(binding.sockets):
            return binding
        self.release([binding])
        return None

    def keep(self, binding: Binding, conn: int, host: IPAddress) -> None:
        """A connection nobody took: the next accept on its listener gets it.

        We took it off the kernel's queue, so the listener may no longer be
        readable, and a server that accepts only when epoll says so (nginx,
        asyncio: both wait for readiness after an EMFILE) would never come
        back for it.  So a connection of our own, the doorbell, is queued on
        the listener (at real *host*) while any is kept; the accept that meets
        it discards it and goes on as if it had not been there."""
        kept = self.kept.get(binding.real_port)
        if kept is None:
            kept = self.kept[binding.real_port] = Kept()
        kept.append(conn)
        if kept.bell is None:
            kept.ring(host, binding.real_port)

    def sweep(self) -> None:
        """Release bindings whose sockets the app has all closed, and forget
        each closed socket of a binding that has others."""
        with self._lock:
            bindings = [*self.virtual.values(), *self.inert.values()]
        if not bindings:
            return
        ports = [binding.real_port for binding in bindings]
        try:
            listening = _sockdiag.listening_inodes((min(ports), max(ports)))
        except OSError as exc:
            if exc.errno in NO_FD:
                raise  # no fd for the kernel's list: the engine makes room
            log.warning("cannot list listening sockets: %s", exc)
            return
        gone_sockets = {id(s) for s in closed([s for b in bindings for s in b.sockets], listening)}
        gone = []
        with self._lock:
            for binding in bindings:
                left = [s for s in binding.sockets if id(s) not in gone_sockets]
                if left:
                    binding.sockets[:] = left
                else:
                    gone.append(binding)
        self.release(gone)

    def release(self, gone: list[Binding]) -> None:
        """Forget *gone*; release the node's claims of those of the virtual address."""
        retiring: list[tuple[Binding, bytes]] = []
        with self._lock:
            for binding in gone:
                if self._by_address.get(binding.virtual) is binding:
                    del self._by_address[binding.virtual]
                if binding.inert:
                    self.inert.pop(binding.real_port, None)
                    self.inert_names.pop(binding.real_port, None)
                    continue
                self.virtual.pop(binding.real_port, None)
                self.serving.pop(binding.real_port, None)
                name = self.names.pop(binding.real_port, None)
                if name is not None:
                    retiring.append((binding, name))
                kept = self.kept.pop(binding.real_port, None)
                if kept is not None:
                    kept.close()
        for binding, name in retiring:
            self._retire(binding, name)
        for binding in gone:
            if binding.inert:
                log.debug("released inert=%s", binding.virtual)
                continue
            if binding.listening:
                log.info("released service=%s", binding.virtual)
            else:  # a client's bind (curl --interface): one per connection
                log.debug("released binding=%s", binding.virtual)
            self._release(binding.virtual)

    def snapshot(self) -> list[Binding]:
        """The bindings of the app's virtual address (for another thread)."""
        with self._lock:
            return list(self.virtual.values())


class Kept(collections.deque[int]):
    """Connections kept for one listener, and the doorbell rung for them.

    True while either is there: the fast path then leaves every accept on the
    listener to Python (``kept_for`` in ``_fastpath.c``)."""

    bell: _socket.socket | None = None
    #: Where the doorbell connects from, as its accept reports the peer.
    bell_from: tuple[IPAddress, int] | None = None

    def __bool__(self) -> bool:
        return len(self) > 0 or self.bell is not None

    def ring(self, host: IPAddress, port: int) -> None:
        """Queue a connection of ours on the listener at real ``host:port``,
        with a byte, so that a listener with TCP_DEFER_ACCEPT (nginx's
        "deferred") queues it too.  The handshake is local, done at once;
        only a full backlog makes it wait, and then the listener is readable
        anyway: the wait is cut short (the engine thread waits with it)."""
        family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
        bell = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        bell.settimeout(BELL_WAIT_S)
        try:
            with contextlib.suppress(TimeoutError):
                bell.connect((str(host), port))
                bell.send(b"\0")
            local = bell.getsockname()
        except OSError as exc:
            bell.close()
            log.warning("cannot ring the listener at port %s for a kept connection: %s", port, exc)
            return
        self.bell, self.bell_from = bell, (ip_address(local[0]), local[1])

    def answers(self, peer: bytes) -> bool:
        """Whether a connection accepted from *peer* is the doorbell."""
        return self.bell_from is not None and inet_endpoint(peer) == self.bell_from

    def silence(self) -> None:
        if self.bell is not None:
            self.bell.close()
        self.bell = self.bell_from = None

    def close(self) -> None:
        self.silence()
        while self:
            os.close(self.popleft())


def closed(sockets: list[BoundSocket], listening: set[int]) -> list[BoundSocket]:
    """Those of *sockets* that the app has closed.

    A listening socket is cheap to tell (the kernel's list of listeners).
    One only bound, or one that has left that list (closed, or only shut
    down: ``shutdown(SHUT_RD)`` stops a listener, which the app may still
    name, and ``listen`` on again), is looked for in the fd table of the thread that bound
    it, then, if not there, in those of every process of the app: the thread
    may be gone while another thread or a child still holds the socket
    (bind, fork, listen later).  Each fd table is read at most once per
    call, so a sweep costs as much as the app has fds, not that squared.
    """
    tables: dict[int, set[int]] = {}

    def held_by(pid: int, inode: int) -> bool:
        if pid not in tables:
            tables[pid] = _sockdiag.socket_inodes(pid)
        return inode in tables[pid]

    unseen = [s for s in sockets if s.inode not in listening and not held_by(s.pid, s.inode)]
    if not unseen:
        return unseen
    app = _sockdiag.descendants(os.getpid())
    return [s for s in unseen if not any(held_by(pid, s.inode) for pid in app)]
