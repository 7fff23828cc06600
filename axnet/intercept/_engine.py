"""The notification engine: an app's trapped socket calls, carried out on its behalf.

Theory of operation
-------------------
The seccomp filter (``_bpf``) sends ``connect``, ``bind``, ``listen``,
``accept``/``accept4``, ``getsockname`` and ``getpeername`` here, and any
send that asks for TCP Fast Open (``MSG_FASTOPEN``).  For each
notification the engine

1. takes a duplicate of the app's socket with ``pidfd_getfd`` — the *same*
   open file description the app holds, so socket options, ``O_NONBLOCK`` and
   epoll registrations stay the app's own (``_tasks`` keeps the pidfds);
2. copies any sockaddr argument into private memory, then checks with
   ``SECCOMP_IOCTL_NOTIF_ID_VALID`` that the notification is still live.  A
   live notification means the thread is still parked in the call, so its id
   was not reused and the copy came from the right address space;
3. decides from the private copy (``axnet._verdict``) and acts on the
   duplicate: connects it, binds it, listens on it, accepts from it;
4. answers with the result.  ``SECCOMP_USER_NOTIF_FLAG_CONTINUE`` is used only
   where nothing the app can still change entered the decision (``accept`` and
   ``getsockname``/``getpeername`` on sockets that are not virtual).  Results
   written into the app (accept's peer address, getsockname's address) go
   through a ``/proc/TID/mem`` handle that names one address space for life.

Everything runs in one OS thread around one epoll set: a trio wake-up per
notification would cost more than the whole decision, and a thread hand-off
per blocking call costs as much again.  A call that would block — a blocking
``connect`` still in progress, a blocking ``accept`` with nothing queued — is
started without blocking (``O_NONBLOCK`` flipped on the shared description for
the one call: the app's thread is parked in that very call, and every accept
on a virtual listener comes through here) and the socket joins the epoll set;
the app's thread stays parked until the socket is ready (``_parked`` keeps
these calls, and checks them for threads that went away, signals and socket
timeouts).  A connection accepted for an ``accept`` whose thread went away is
kept and handed to the next ``accept`` on that listener: it is never lost.

The table and identity are read here and replaced (whole objects) by the
supervisor's trio thread; a lookup is a single dictionary read.  What the app
has bound, and the connections kept for its listeners, are kept by
``_bindings``; the virtual and inert binds are made by ``_binder``; where
connections to virtual services leave from (address, client port block) is
set by ``_source``.

The hot path — a redirected ``connect``, an ``accept`` on a virtual listener,
``getsockname``/``getpeername`` — also exists in C (``_fastpath.c``), which
receives each notification first and answers it when it can; whatever it
cannot answer it hands back here before doing anything the app could see, or
hands over exactly what is left to do (a connection to deliver, a connect to
wait for).  Without the compiled module, or with ``AXNET_FASTPATH=0`` in the
supervisor's environment, this module answers everything itself.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import fcntl
import functools
import logging
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator

import attrs

from .._node import ClaimError
from .._table import (
    IPAddress,
    RealAddress,
    ServiceTable,
    VirtualAddress,
    packed_ip,
)
from .._verdict import (
    BindInert,
    BindNodePort,
    BindVirtual,
    Deny,
    Identity,
    Passthrough,
    Redirect,
    ToInert,
    decide_bind,
    decide_connect,
)
from . import _raw, _sockdiag
from ._appfs import AppFs, is_path_address
from ._binder import WILDCARD4, WILDCARD6, Binder, NodeLink, fits, local_endpoint, pack
from ._bindings import LOOPBACK4, LOOPBACK6, Binding, Bindings
from ._bpf import (
    NR_ACCEPT,
    NR_ACCEPT4,
    NR_BIND,
    NR_CONNECT,
    NR_GETPEERNAME,
    NR_GETSOCKNAME,
    NR_LISTEN,
    NR_SENDMMSG,
    NR_SENDMSG,
    NR_SENDTO,
)
from ._decode import (
    MAX_SOCKADDR_LEN,
    SockaddrError,
    inet_endpoint,
    unspec_wildcard_as_inet,
)
from ._libc import Notification, NotifyFd, buffer_sizes
from ._parked import WAIT_SLICE_S, ParkedCalls
from ._parked import next_check as next_parked_check
from ._source import ClientSource, pinned
from ._tasks import NO_FD, Errno, Gone, Tasks, gone_or_errno

try:
    from . import _fastpath
except ImportError:  # built without a C compiler: the Python path does everything
    _fastpath = None  # type: ignore[assignment]

log = logging.getLogger("axnet.run")

#: How often bindings are checked for sockets the app closed, in seconds.
SWEEP_INTERVAL_S = 1.0
_INT32 = struct.Struct("=i")
_INT32_MAX = 0x7FFFFFFF
_ACCEPT4_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_AF_INET = int(socket.AF_INET)
_AF_UNIX = int(socket.AF_UNIX)
_AF_INET6 = int(socket.AF_INET6)
#: sizeof(struct sockaddr_in6): the least length SELinux and Landlock take an IPv6 address at.
_SOCKADDR_IN6_LEN = 28
_STREAM = int(socket.SOCK_STREAM)
_INET = (_AF_INET, _AF_INET6)


#: The context of a call that needs none (reusable).
_NOTHING = contextlib.nullcontext()


@attrs.define
class Counters:
    notifications: int = 0
    redirected: int = 0
    refused: int = 0
    passed: int = 0
    deferred: int = 0
    faults: int = 0
    errors: int = 0
    #: Parked calls answered ERESTARTSYS because a signal waited for their thread.
    interrupted: int = 0


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _host_listens(port: int) -> bool:
    """Whether a real TCP listener of the host has *port* (any address: one
    reached on loopback, as like as not); False when the kernel cannot say."""
    try:
        return bool(_sockdiag.listening_inodes((port, port)))
    except OSError:
        return False


def _ready(fd: int, events: int) -> bool:
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(0))


class Engine:
    """Answers the notifications of one app (all its processes and threads)."""

    def __init__(
        self,
        notify: NotifyFd,
        *,
        identity: Identity,
        table: ServiceTable,
        node: NodeLink,
        busy_poll_us: int = 0,
    ) -> None:
        """*busy_poll_us*: how long the C loop polls without sleeping after
        an accept parks, and after each answer for the app's next call
        (``axnet run --busy-poll``; the Python engine sleeps)."""
        self.notify = notify
        self.identity = identity
        self.table = table
        self.node = node
        self.bindings = Bindings(self._release_claim)
        self._binder = Binder(self.bindings, node)
        self._source = ClientSource()
        self.counters = Counters()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._appfs: AppFs | None = None  # made by serve(), in the engine thread
        self._tasks = Tasks(notify.id_valid)
        #: The identity for which the daemon had no more client ports.
        self._no_more_ports: Identity | None = None
        self._me_identity: Identity | None = None
        self._me = b""
        self._fast = None
        if _fastpath is not None and os.environ.get("AXNET_FASTPATH", "1") != "0":
            notif_size, resp_size = buffer_sizes()
            self._fast = _fastpath.Fast(
                fd=notify.fileno(),
                notif_size=notif_size,
                resp_size=resp_size,
                pidfds=self._tasks.pidfds,
                mems=self._tasks.mems,
                maps=self._tasks.maps,
                names=self.bindings.names,
                inert=self.bindings.inert_names,
                pending=self.bindings.kept,
                sources=self._source.routes,
                busy_poll_us=busy_poll_us,
                adopt=self._tasks.adopt if self._tasks.keeps else None,
                retired=self.bindings.retired,
                serving=self.bindings.serving,
            )
        self._parked = ParkedCalls(
            notify, self.counters, self._fast, run=self._guarded, reply=self._reply
        )
        self._handlers: dict[int, Callable[[Notification], None]] = {
            NR_CONNECT: self._on_connect,
            NR_BIND: self._on_bind,
            NR_LISTEN: self._on_listen,
            NR_ACCEPT: self._on_accept,
            NR_ACCEPT4: self._on_accept,
            NR_GETSOCKNAME: self._on_getname,
            NR_GETPEERNAME: self._on_getname,
            NR_SENDTO: self._on_fastopen,
            NR_SENDMSG: self._on_fastopen,
            NR_SENDMMSG: self._on_fastopen,
        }

    # -- loop -----------------------------------------------------------------

    def serve(self) -> None:
        """Answer notifications until :meth:`stop` or until no target is left.

        Runs in a thread of its own, which takes no signals: they go to the
        supervisor's main thread, and none can interrupt a seccomp ioctl here.
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        self._appfs = AppFs()  # never raises: without it, paths resolve from here
        try:
            # Hand the CPU straight between the app and this thread (Linux 6.6).
            self.notify.set_sync_wakeup()
        except OSError:
            pass
        turn = self._native_turn if self._fast is not None else self._python_turns()
        next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        next_check = 0.0
        parked = self._parked
        try:
            while not self._stopping:
                slice_s = WAIT_SLICE_S if parked.waiting() else SWEEP_INTERVAL_S
                if not turn(int(slice_s * 1000)):
                    return
                now = time.monotonic()
                # Asked again: the turn may have parked a call (in C, without Python).
                if now >= next_check and parked.waiting():
                    parked.check_waits()
                    next_check = next_parked_check(now, time.monotonic())
                if now >= next_sweep:
                    next_sweep = now + SWEEP_INTERVAL_S
                    self.sweep()
        finally:
            log.info(
                "engine done python=%s native=%s",
                attrs.asdict(self.counters),
                self._fast.counters if self._fast is not None else "off",
            )
            if self._fast is not None:
                self._fast.close()
            self._parked.close()
            self._tasks.close()
            self._appfs.close()

    def stop(self) -> None:
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _python_turns(self) -> Callable[[int], bool]:
        """One turn of the Python loop: wait up to a timeout, answer what is ready."""
        nfd, epfd, wake = self.notify.fileno(), self._parked.epoll_fd, self._wake_r
        # The loop sleeps in poll(), not epoll_wait(): with SYNC_WAKE_UP the
        # kernel wakes a poll() sleeper on the app's own CPU, while an epoll
        # sleeper is woken wherever it sleeps.  Parked waits live in an epoll
        # set that poll() watches as one more fd.
        poller = select.poll()
        for fd in (nfd, wake, epfd):
            poller.register(fd, select.POLLIN)

        def turn(timeout_ms: int) -> bool:
            ready = dict(poller.poll(timeout_ms))
            if wake in ready:
                return False
            if epfd in ready:  # calls that waited go before new ones, as in C
                self._parked.wake_waiters()
            events = ready.get(nfd, 0)
            if events & select.POLLIN:
                self._serve_one()
            elif events & (select.POLLHUP | select.POLLERR):
                return False  # every filtered task is gone
            return True

        return turn

    def _native_turn(self, timeout_ms: int) -> bool:
        """One turn of the native loop (the same, in C); Python only for what it hands back."""
        assert self._fast is not None
        out = self._fast.serve(
            self, self._wake_r, self._parked.epoll_fd, timeout_ms, int(WAIT_SLICE_S * 1000)
        )
        if isinstance(out, tuple):
            kind, fd, extra, nid, pid, flags, nr, arch, ip, args = out
            n = Notification(nid, pid, flags, nr, arch, ip, args)
            self.counters.notifications += 1
            if kind == _fastpath.DELIVER:
                self._guarded(n, self._deliver_handed, n, fd, extra)
            elif kind == _fastpath.CONNECTING:
                # CONNECTING carries the destination, and what connect() said.
                assert isinstance(extra, tuple) and len(extra) == 2
                target, started = extra
                self._parked.wait(
                    n,
                    _socket.socket(fileno=fd),
                    select.EPOLLOUT,
                    functools.partial(self._connected, target=target),
                    timed_out=started,
                )
            else:
                self._dispatch(n)
            return True
        if out == _fastpath.WAITERS:
            self._parked.wake_waiters()
            return True
        return out == _fastpath.TIMEOUT  # not WAKE (stop) nor HUP (no task left)

    def _serve_one(self) -> None:
        try:
            n = self.notify.recv()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):
                return  # the task died between the wake-up and RECV
            raise
        self.counters.notifications += 1
        self._dispatch(n)

    def _dispatch(self, n: Notification) -> None:
        handler = self._handlers.get(n.nr)
        if handler is None:
            # Not a call the filter traps; never happens unless the filter
            # and this table disagree.  Answer as the kernel would.
            self._reply(n, error=errno.ENOSYS)
            return
        self._guarded(n, handler, n)

    def _guarded(self, n: Notification, step: Callable[..., None], *args: object) -> None:
        """Run one step of answering *n*; every failure still answers it."""
        try:
            step(*args)
        except Errno as exc:
            self._reply(n, error=exc.errno)
        except Gone:
            # Nobody to answer, as a rule; should the thread still wait after
            # all, it must not wait forever.
            if self.notify.id_valid(n.id):
                self._reply(n, error=errno.EIO)
        except OSError as exc:
            if exc.errno not in NO_FD:
                self._failed(n)
                return
            # Our fd table is full where no step made room first: this call
            # fails as the kernel's would, and the cached handles go, so
            # that the next one finds room (said once, by relieve).
            self._tasks.relieve()
            self._reply(n, error=exc.errno)
        except Exception:
            self._failed(n)

    def _failed(self, n: Notification) -> None:
        """A step failed in a way nothing foresaw: said, counted, and the
        call answered EIO."""
        self.counters.errors += 1
        log.exception("engine error nr=%s pid=%s", n.nr, n.pid)
        self._reply(n, error=errno.EIO)

    def _packed_me(self) -> bytes:
        """The identity as the fast path reads it: real host, vip, block lo,
        hi, spill lo, hi (0 for none)."""
        me = self.identity
        if me is not self._me_identity:
            ports = (*(me.block or (0, 0)), *(me.spill or (0, 0)))
            self._me = (
                packed_ip(me.real_host)
                + packed_ip(me.vip)
                + b"".join(port.to_bytes(2, "big") for port in ports)
            )
            self._me_identity = me
        return self._me

    def _deliver_handed(
        self,
        n: Notification,
        conn: int,
        extra: tuple[int, int, bytes, int | None] | tuple[bytes, int] | None,
    ) -> None:
        """Finish an accept the fast path started: it has the connection, not the answer.

        It read the app's ``*addrlen`` once (None: it could not) after the
        accept, and may have stored the address (and the full length)
        already, before the app could not take the fd: the address is stored
        again with the room it read, never the length it wrote."""
        # DELIVER: (family, real port, peer, the app's *addrlen as read, or None)
        assert isinstance(extra, tuple) and len(extra) == 4
        family, real_port, peer, room = extra
        flags = _int32(n.args[3]) if n.nr == NR_ACCEPT4 else 0
        binding = self.bindings.at(real_port)
        if binding is None:  # cannot happen: the fast path found it a moment ago
            os.close(conn)
            raise Errno(errno.ECONNABORTED)
        self._deliver(n, family, conn, peer, flags, binding, room=room)

    # -- answers --------------------------------------------------------------

    def _reply(self, n: Notification, *, value: int = 0, error: int = 0) -> None:
        try:
            self.notify.respond(n.id, val=value, error=error)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def _continue(self, n: Notification) -> None:
        try:
            self.notify.respond_continue(n.id)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def _check(self, n: Notification) -> None:
        if not self.notify.id_valid(n.id):
            raise Gone

    # -- reaching into the app --------------------------------------------------

    def _dup(self, n: Notification) -> _socket.socket:
        """Our duplicate of the app's socket ``args[0]`` (family and type probed)."""
        fd = self._dup_fd(n)
        try:
            return _as_socket(fd)
        except BaseException:
            os.close(fd)
            raise

    def _dup_fd(self, n: Notification) -> int:
        """Our duplicate of the app's fd ``args[0]``, whatever it is (else EBADF)."""
        target = _int32(n.args[0])
        if target < 0:
            raise Errno(errno.EBADF)
        return self._tasks.getfd(n.pid, target)

    def _read_sockaddr(self, n: Notification, ptr: int, length: int) -> bytes:
        if length > MAX_SOCKADDR_LEN:
            raise Errno(errno.EINVAL)
        if length == 0:
            return b""
        try:
            # Through the cached /proc/TID/mem handle: one pread, no iovecs.
            return self._tasks.read(n.pid, n.id, ptr, length)
        except Errno:
            self.counters.faults += 1
            raise

    def _store_sockaddr(
        self,
        n: Notification,
        addr_ptr: int,
        len_ptr: int,
        encoded: bytes,
        room: int | None = None,
    ) -> None:
        """Store a result address the way the kernel does (truncate, report full
        length): a NULL length pointer, or a NULL address with room, is EFAULT.
        The full length is stored first, as Linux's move_addr_to_user() does
        (6.18): an address that faults leaves it reported all the same.
        *room*: the app's ``*addrlen`` where it was read already (once, as
        the kernel reads it)."""
        if room is None:
            try:
                (room,) = _INT32.unpack(self._tasks.read(n.pid, n.id, len_ptr, 4))
            except Errno:
                self.counters.faults += 1
                raise
        if room < 0:
            raise Errno(errno.EINVAL)
        writes = [(len_ptr, _INT32.pack(len(encoded)))]
        if room:
            writes.append((addr_ptr, encoded[:room]))
        try:
            self._tasks.write(n.pid, n.id, writes)
        except Errno:
            self.counters.faults += 1
            raise

    # -- connect ---------------------------------------------------------------

    def _sockaddr_call(
        self, n: Notification
    ) -> tuple[_socket.socket, bytes, tuple[IPAddress, int] | None]:
        """The common start of ``connect`` and ``bind``: (our duplicate of the
        socket, the private copy of the sockaddr, its inet endpoint when the
        socket is an inet stream socket of the same family, else None)."""
        # The kernel's order of errors: the fd (EBADF); for bind, whether it
        # is a socket (ENOTSOCK); the address (EINVAL, EFAULT); for connect,
        # whether it is a socket.
        fd = self._dup_fd(n)
        sock: _socket.socket | None = None
        try:
            if n.nr == NR_BIND:
                sock = _as_socket(fd)
            length = n.args[2] & 0xFFFFFFFF
            if length > MAX_SOCKADDR_LEN:
                raise Errno(errno.EINVAL)
            raw = self._read_sockaddr(n, n.args[1], length)
            self._check(n)
            if sock is None:
                sock = _as_socket(fd)
            endpoint = None
            if sock.type == _STREAM and sock.family in _INET:
                endpoint = self._endpoint(raw, sock.family)
        except BaseException:
            if sock is not None:
                sock.close()
            else:
                os.close(fd)
            raise
        return sock, raw, endpoint

    def _on_connect(self, n: Notification) -> None:
        sock, raw, endpoint = self._sockaddr_call(n)
        try:
            target = raw
            pinned = False
            if endpoint is not None:
                ip, port = endpoint
                verdict = decide_connect(
                    self.table,
                    self.identity,
                    ip,
                    port,
                    host_listens=_host_listens,
                    inert=self._inert_port,
                )
                match verdict:
                    case Redirect():
                        try:
                            target = pack(sock.family, verdict.real.host, verdict.real.port)
                        except Errno:
                            log.info(
                                "connect unreachable addr=%s:%d reason=an IPv4 socket cannot "
                                "reach its real address %s",
                                ip,
                                port,
                                verdict.real,
                            )
                            raise
                        self.counters.redirected += 1
                        if ip.version == 6 and verdict.real.host.version == 4:
                            # An IPv6-only socket cannot reach the v4-mapped
                            # real address of an IPv6 virtual one
                            # (ENETUNREACH); unbound, it may still be told to
                            # (as in Binder.bind_virtual).  One that asked for a
                            # v4-mapped address gets the kernel's answer.
                            with contextlib.suppress(OSError):
                                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                        self._source.bind_address(sock, verdict.real.host, self.identity.real_host)
                        if self.identity.block is None:  # the node had none for it
                            self._source.spill_ports(sock, self.identity)
                            pinned = True  # when they are full, ask for one
                        else:
                            pinned = self._source.pin_ports(sock, self.identity.block)
                    case Deny() if not _engaged(sock):
                        self.counters.refused += 1
                        raise _refused(n, "connect", ip, port, verdict)
                    case Deny():
                        # Connected, connecting or listening: the kernel's
                        # answer for that state comes first (EISCONN, EALREADY,
                        # or a wait for the handshake under way), whatever the
                        # address.  Asked of it with one that goes nowhere,
                        # should the socket be reset meanwhile.
                        self.counters.passed += 1
                        loopback = LOOPBACK6 if sock.family == _AF_INET6 else LOOPBACK4
                        target = pack(sock.family, loopback, 0)
                    case ToInert():
                        # Loopback to loopback, as natively: no source of ours.
                        self.counters.passed += 1
                        loopback = LOOPBACK6 if ip.version == 6 else LOOPBACK4
                        target = pack(sock.family, loopback, verdict.real_port)
                    case Passthrough():
                        self.counters.passed += 1
            self._connect_as_app(n, sock, target, pinned=pinned)
            sock = None  # type: ignore[assignment]  # _connect owns it now
        finally:
            if sock is not None:
                sock.close()

    def _inert_port(self, version: int, port: int) -> int | None:
        """The real port (on loopback) of the app's inert wildcard of IP
        *version* at *port*, if it holds one."""
        wildcard = WILDCARD6 if version == 6 else WILDCARD4
        binding = self.bindings.live(VirtualAddress(ip=wildcard, port=port))
        return None if binding is None else binding.real_port

    def _on_fastopen(self, n: Notification) -> None:
        """A send with ``MSG_FASTOPEN`` (the filter traps no other send).

        On a TCP socket it would connect inside the send, to an address read
        from the app's memory after any check of ours: a virtual IP would
        leave on the real network.  Answered as a kernel with client Fast
        Open switched off answers (``net.ipv4.tcp_fastopen``): EOPNOTSUPP,
        whether the socket is connected or not.  Apps fall back to
        ``connect()``, which comes here.  Other sockets, which ignore the
        flag, get the same answer: the kernel cannot be left to run the call
        (CONTINUE), since the app can swap another socket in under the fd
        number between our look and the kernel's.
        """
        sock = self._dup(n)  # EBADF, ENOTSOCK as the kernel would answer
        sock.close()
        self.counters.refused += 1
        raise Errno(errno.EOPNOTSUPP)

    @staticmethod
    def _endpoint(raw: bytes, family: int) -> tuple[IPAddress, int] | None:
        """The destination of an inet sockaddr of the socket's own family, else None."""
        if len(raw) < 2 or (raw[0] | raw[1] << 8) != family:
            return None  # a family mismatch is the kernel's to refuse
        try:
            return inet_endpoint(raw)
        except SockaddrError as exc:
            raise Errno(exc.errno) from None

    def _connect_as_app(
        self, n: Notification, sock: _socket.socket, target: bytes, *, pinned: bool = False
    ) -> None:
        with self._as_app(n, target):
            self._connect(n, sock, target, pinned=pinned)

    def _connect(
        self, n: Notification, sock: _socket.socket, target: bytes, *, pinned: bool = False
    ) -> None:
        """Connect the app's socket with blocking semantics preserved; owns *sock*."""
        fd = sock.fileno()
        app_flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        err = _connect_nonblocking(fd, target, app_flags)
        if pinned and err == errno.EADDRNOTAVAIL:
            err = self._connect_past_block(sock, target, app_flags)
        if not app_flags & os.O_NONBLOCK and err in (errno.EINPROGRESS, errno.EALREADY):
            if not _ready(fd, select.POLLOUT):
                self._parked.wait(
                    n,
                    sock,
                    select.EPOLLOUT,
                    functools.partial(self._connected, target=target),
                    timed_out=err,
                )
                return
            err = _connect_nonblocking(fd, target, app_flags)  # see _connected
        if not app_flags & os.O_NONBLOCK and err == errno.EAGAIN and sock.family == _AF_UNIX:
            # The listener's backlog is full: the kernel's blocking connect
            # waits for room (and looks the path up again), so do we.
            self._parked.retry(n, sock, lambda n2, s2: self._connect_as_app(n2, s2, target))
            return
        sock.close()
        self._reply(n, error=err)

    def _connect_past_block(self, sock: _socket.socket, target: bytes, app_flags: int) -> int:
        """The app's current client port block is full (the connect failed,
        leaving the socket as it was): connect from a free port of another
        block it holds, which connects use from then on, else of one more
        from the daemon, else from the node's spill ports.  0 or the errno."""
        fd = sock.fileno()
        me = self.identity
        for block in me.blocks:
            if block == me.block:
                continue
            self._source.pin_ports(sock, block)
            err = _connect_nonblocking(fd, target, app_flags)
            if err != errno.EADDRNOTAVAIL:
                log.debug("client port block %s full; connecting from %s again", me.block, block)
                self.node.use_block(block)
                return err
        if self._more_ports():
            self._source.pin_ports(sock, self.identity.block)
            err = _connect_nonblocking(fd, target, app_flags)
            if err != errno.EADDRNOTAVAIL:
                return err
        self._source.spill_ports(sock, self.identity)
        return _connect_nonblocking(fd, target, app_flags)

    def _more_ports(self) -> bool:
        """Every client port block of the app is full: whether it got another
        from the daemon (which grants a few), now its identity's."""
        me = self.identity
        if me is self._no_more_ports:
            return False  # asked already: not at every connect
        used_up = me.block
        if self.node.more_ports() is None:
            self._no_more_ports = me
            return False
        if used_up is None:
            log.info(
                "took client port block %s (the node had none at the start)", self.identity.block
            )
        else:
            log.info("client port block %s used up; took %s", used_up, self.identity.block)
        return True

    def _connected(self, n: Notification, sock: _socket.socket, target: bytes) -> None:
        """A blocking connect finished (or failed) while the app waited.

        Answered by connecting once more, without blocking, as the kernel's
        blocking connect does after its wait: that marks the socket
        connected (a later connect() fails with EISCONN, not 0), or reports
        the handshake's error and leaves it unconnected (a later connect()
        tries afresh).  SO_ERROR would leave it "connecting" for good.
        See :func:`_finish_connect` for a socket shut down meanwhile.
        """
        try:
            fd = sock.fileno()
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            self._reply(n, error=_finish_connect(sock, target, flags))
        finally:
            sock.close()

    # -- bind / listen -----------------------------------------------------------

    def _on_bind(self, n: Notification) -> None:
        sock, raw, endpoint = self._sockaddr_call(n)
        try:
            if (
                endpoint is None
                and sock.type == _STREAM
                and sock.family == _AF_INET
                and (inet := unspec_wildcard_as_inet(raw)) is not None
            ):
                # The kernel binds AF_UNSPEC + 0.0.0.0 as the wildcard.
                raw, endpoint = inet, self._endpoint(inet, _AF_INET)
            try:
                self._bind_as_decided(n, sock, raw, endpoint)
            except Errno as exc:
                if (
                    exc.errno != errno.EADDRINUSE
                    or not self._parked.waiting()
                    or not self._parked.drop_gone()
                ):
                    raise
                # In use by a socket of the app's that only a call of a thread
                # gone since held open (an exec in another thread): free now.
                self._bind_as_decided(n, sock, raw, endpoint)
            self._reply(n)
        finally:
            sock.close()

    def _bind_as_decided(
        self,
        n: Notification,
        sock: _socket.socket,
        raw: bytes,
        endpoint: tuple[IPAddress, int] | None,
    ) -> None:
        """Bind as `_bind_decided` says, or as the app asked where that is the
        kernel's to do.  Raises Errno."""
        if endpoint is not None and self._bind_decided(n, sock, *endpoint) is not False:
            return
        with self._as_app(n, raw):
            err = _raw.bind(sock.fileno(), raw)
        if err:
            raise Errno(err)

    def _bind_decided(
        self, n: Notification, sock: _socket.socket, ip: IPAddress, port: int
    ) -> Binding | bool:
        """Bind an inet stream socket to ``ip:port`` as ``decide_bind`` says:
        the binding made, True when bound without one (a port of the node's
        own), or False when the bind is the kernel's to make.  Raises Errno."""
        ipv6 = sock.family == _AF_INET6
        v6only = ipv6 and bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        verdict = decide_bind(self.table, self.identity, ip, port, ipv6_socket=ipv6, v6only=v6only)
        match verdict:
            case BindVirtual():
                return self._binder.bind_virtual(sock, verdict.port, n.pid, self.identity)
            case BindInert():
                log.info(
                    "bind inert pid=%s addr=%s reason=%s",
                    n.pid,
                    VirtualAddress(ip=ip, port=port),
                    verdict.reason,
                )
                return self._binder.bind_inert(sock, verdict.port, n.pid)
            case BindNodePort():
                self._binder.bind_node_port(sock, self.identity)
                return True
            case Deny():
                raise _refused(n, "bind", ip, port, verdict)
            case Passthrough():
                return False

    def _as_app(self, n: Notification, raw: bytes) -> contextlib.AbstractContextManager[None]:
        """For a path socket address, the app thread's directory and umask;
        for any other address nothing (the inet connect path pays no more)."""
        if self._appfs is None or not is_path_address(raw):
            return _NOTHING
        return self._in_app_dir(n)

    @contextlib.contextmanager
    def _in_app_dir(self, n: Notification) -> Iterator[None]:
        assert self._appfs is not None
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self._appfs.like(n.pid, lambda: self._check(n)))
            except OSError as exc:
                raise gone_or_errno(exc) from None
            yield

    def _binding_of(self, sock: _socket.socket) -> Binding | None:
        """The virtual binding behind *sock*, if it is one of ours (not inert)."""
        family = sock.family
        if sock.type != _STREAM or family not in _INET:
            return None
        try:
            ip, port = local_endpoint(sock)
        except OSError:
            return None
        if ip != self.identity.real_host:
            return None
        return self.bindings.at(port)

    def _on_listen(self, n: Notification) -> None:
        backlog = _int32(n.args[1])
        sock = self._dup(n)
        try:
            self._check(n)
            binding = self._binding_of(sock)
            family = sock.family
            if (
                binding is None
                and sock.type == _STREAM
                and family in _INET
                and local_endpoint(sock)[1] == 0
            ):
                # listen() on an unbound socket binds it to any port of the
                # wildcard first.
                wildcard = WILDCARD6 if family == _AF_INET6 else WILDCARD4
                made = self._bind_decided(n, sock, wildcard, 0)
                binding = made if isinstance(made, Binding) else None
            try:
                # The kernel takes a negative backlog as "as many as allowed";
                # CPython would make it 0.
                sock.listen(backlog if backlog >= 0 else _INT32_MAX)
            except OSError as exc:
                raise Errno(exc.errno or errno.EINVAL) from None
            if binding is None and sock.type == _STREAM and family in _INET:
                binding = self.bindings.inert_at(*local_endpoint(sock))
            if binding is not None:
                inode = os.fstat(sock.fileno()).st_ino
                for member in binding.sockets:
                    if member.inode == inode:
                        member.listening = True
            if binding is not None and not binding.inert and not binding.listening:
                self.bindings.serve(binding)
                try:
                    self.node.listen(binding.virtual)
                except ClaimError as exc:
                    log.warning("publish failed service=%s reason=%s", binding.virtual, exc)
                log.info(
                    "listening service=%s real=%s",
                    binding.virtual,
                    RealAddress(host=self.identity.real_host, port=binding.real_port),
                )
            self._reply(n)
        finally:
            sock.close()

    # -- accept ------------------------------------------------------------------

    def _on_accept(self, n: Notification) -> None:
        flags = _int32(n.args[3]) if n.nr == NR_ACCEPT4 else 0
        # The kernel's order of errors: the fd (EBADF), the flags (EINVAL),
        # whether it is a socket (ENOTSOCK).
        fd = self._dup_fd(n)
        if flags & ~_ACCEPT4_FLAGS:
            os.close(fd)
            raise Errno(errno.EINVAL)
        try:
            sock = _as_socket(fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            binding = self._binding_of(sock)
            if binding is None:
                self._continue(n)
                return
            self._accept(n, sock, flags, binding)
            sock = None  # type: ignore[assignment]  # _accept owns it now
        finally:
            if sock is not None:
                sock.close()

    def _accept(self, n: Notification, sock: _socket.socket, flags: int, binding: Binding) -> None:
        """Accept one connection for the app, or wait for one; owns *sock*."""
        family = sock.family
        kept = self.bindings.kept.get(binding.real_port)
        # Connections kept for this listener go first (one taken by a wait
        # whose thread had just died reaches the next accept that wakes).
        if kept is not None and len(kept):
            sock.close()
            self._deliver(n, family, kept.popleft(), None, flags, binding)
            return
        fd = sock.fileno()
        try:
            app_flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except BaseException:
            sock.close()
            raise
        try:
            try:
                conn, peer = _accept_nonblocking(fd, app_flags)
            except OSError as exc:
                if exc.errno not in NO_FD:
                    raise
                self._tasks.relieve()  # our fd table is full, not the app's
                conn, peer = _accept_nonblocking(fd, app_flags)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) and not app_flags & os.O_NONBLOCK:
                self._parked.wait(
                    n, sock, select.EPOLLIN, lambda n2, s2: self._accept(n2, s2, flags, binding)
                )
                return
            sock.close()
            raise Errno(exc.errno or errno.EIO) from None
        if kept is not None and kept.answers(peer):
            os.close(conn)  # our doorbell (see _keep): no connection of the app's
            kept.silence()
            self._accept(n, sock, flags, binding)
            return
        sock.close()
        self._deliver(n, family, conn, peer, flags, binding)

    def _deliver(
        self,
        n: Notification,
        family: int,
        conn: int,
        peer: bytes | None,
        flags: int,
        binding: Binding,
        *,
        room: int | None = None,
    ) -> None:
        """Hand an accepted connection to the app: peer address, then the fd itself.

        Owns *conn*: it ends in the app, or closed (as the kernel drops a
        connection whose address it cannot store), or kept for the next
        accept on its listener when the app could not take it: its thread
        went away, or it has no fd free (EMFILE, which the kernel answers
        before taking a connection off the queue).
        """
        keep = False
        ours = True  # conn is still ours to close or keep
        try:
            addr_ptr, len_ptr = n.args[1], n.args[2]
            if addr_ptr:  # accept stores the address only when asked for one
                if peer is None:
                    try:
                        peer = _raw.getpeername(conn)
                    except OSError:
                        raise Errno(errno.ECONNABORTED) from None  # reset while queued
                endpoint = inet_endpoint(peer)
                if endpoint is None:
                    raise Errno(errno.EINVAL)
                ip, port = endpoint
                table = self.table
                # A client gone since it connected: named as it was.
                vip = table.virtual_of_client(ip, port) or table.retired_client(ip, port)
                if vip is not None and not fits(family, vip):
                    vip = None  # an IPv6 client's, on an IPv4 socket: the real peer
                self._store_sockaddr(n, addr_ptr, len_ptr, pack(family, vip or ip, port), room=room)
            _set_nonblocking(conn, bool(flags & socket.SOCK_NONBLOCK))
            try:
                # Install, then answer: see NotifyFd.addfd on why not both at once.
                newfd = self.notify.addfd(n.id, conn, cloexec=bool(flags & socket.SOCK_CLOEXEC))
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    keep = True  # the thread stopped waiting (killed)
                    return
                if exc.errno in NO_FD:
                    keep = True
                    raise Errno(exc.errno) from None
                raise
            # The app holds its own reference now.  Drop ours before the
            # answer: an app that closes the connection at once must close the
            # last one, or its FIN waits for this loop (see accept_on in C).
            ours = False
            os.close(conn)
            self._reply(n, value=newfd)
        except Gone:
            keep = True
            raise
        finally:
            if ours and keep:
                self._keep(binding, conn)
            elif ours:
                os.close(conn)

    def _keep(self, binding: Binding, conn: int) -> None:
        self.bindings.keep(binding, conn, self.identity.real_host)

    # -- getsockname / getpeername ------------------------------------------------

    def _on_getname(self, n: Notification) -> None:
        sock = self._dup(n)
        try:
            family = sock.family
            virtual = None
            if sock.type == _STREAM and family in _INET:
                try:
                    if n.nr == NR_GETSOCKNAME:
                        virtual = self._virtual_local(sock)
                    else:
                        virtual = self._virtual_remote(sock)
                except OSError as exc:
                    raise Errno(exc.errno or errno.EINVAL) from None
        finally:
            sock.close()  # before the answer, as in _deliver: the app's close is the last
        if virtual is None or not fits(family, virtual[0]):
            # Not virtual, or an address the socket's family cannot hold (an
            # IPv6 client's, on an IPv4 socket): the kernel's own answer.
            self._continue(n)
            return
        self._store_sockaddr(n, n.args[1], n.args[2], pack(family, virtual[0], virtual[1]))
        self._reply(n)

    def _virtual_local(self, sock: _socket.socket) -> tuple[IPAddress, int] | None:
        ip, port = local_endpoint(sock)
        inert = self.bindings.inert_at(ip, port)
        if inert is not None:
            # The listener shows its wildcard; a connection it accepted (from
            # the app itself, on loopback) the loopback address, as natively.
            try:
                _raw.getpeername(sock.fileno())
            except OSError:  # ENOTCONN: the listener, or a socket only bound
                return inert.virtual.ip, inert.virtual.port
            return ip, inert.virtual.port
        me = self.identity
        if ip != me.real_host:
            return None
        binding = self.bindings.at(port)
        if binding is not None:
            return binding.virtual.ip, binding.virtual.port
        block = me.block
        own = (block is not None and block[0] <= port <= block[1]) or (
            # A block the app used up before its current one is still its
            # own: named as servers name connections from it, by the table.
            self.table.virtual_of_client(ip, port) == me.vip
        )
        if own and pinned(sock):
            return me.vip, port
        # A connection accepted on a listener the app has closed since.
        if self.bindings.retired:
            retired = self.bindings.retired_name(os.fstat(sock.fileno()).st_ino)
            if retired is not None:
                return retired.ip, retired.port
        return None

    def _virtual_remote(self, sock: _socket.socket) -> tuple[IPAddress, int] | None:
        endpoint = inet_endpoint(_raw.getpeername(sock.fileno()))
        if endpoint is None:
            return None
        ip, port = endpoint
        inert = self.bindings.inert_at(ip, port)
        if inert is not None:  # the app's own inert listener, reached on loopback
            return ip, inert.virtual.port
        server = self.table.virtual_of_server(RealAddress(host=ip, port=port))
        if server is not None:
            return server.ip, server.port
        # A client is named only on a connection accepted on a listener of
        # the app, as its accept named it.  Elsewhere a port of a client
        # block is only a port: a real server's (any bind to port 0 may land
        # in a block), or a client's on a listener that is not virtual here
        # (one on loopback, or handed over from another app), which accept
        # showed by its real address.
        accepted = self._accepted(sock)
        vip = self.table.virtual_of_client(ip, port) if accepted else None
        if vip is not None:
            return vip, port
        # A connection the app made to a service withdrawn since: made by a
        # redirect, so its source port was kept in the app's ports (pinned),
        # as no connect to a real address is.  After the client's block,
        # where a block port may have served.
        if pinned(sock):
            server = self.table.retired_server(RealAddress(host=ip, port=port))
            if server is not None:
                return server.ip, server.port
        # A connection from a client gone since: named as it was.
        vip = self.table.retired_client(ip, port) if accepted else None
        if vip is not None:
            return vip, port
        return None

    def _accepted(self, sock: _socket.socket) -> bool:
        """Whether *sock* was accepted on a (virtual) listener of the app."""
        ip, port = local_endpoint(sock)
        return ip == self.identity.real_host and self.bindings.accepted(
            os.fstat(sock.fileno()).st_ino, port
        )

    # -- housekeeping --------------------------------------------------------------

    def sweep(self) -> None:
        """Withdraw bindings whose sockets the app has all closed; forget the
        routes' source addresses (routes change)."""
        try:
            self.bindings.sweep()
        except OSError:  # no fd for the kernel's list of listeners (EMFILE)
            self._tasks.relieve()
            with contextlib.suppress(OSError):
                self.bindings.sweep()
        self._source.forget_routes()

    def _release_claim(self, virtual: VirtualAddress) -> None:
        try:
            self.node.release(virtual)
        except ClaimError as exc:
            log.warning("release failed service=%s reason=%s", virtual, exc)

    def snapshot_bindings(self) -> list[Binding]:
        return self.bindings.snapshot()


def _refused(n: Notification, call: str, ip: IPAddress, port: int, verdict: Deny) -> Errno:
    """Log a refused call (visible at -v) and return the error the app gets."""
    addr = VirtualAddress(ip=ip, port=port)
    log.info("%s refused pid=%s addr=%s reason=%s", call, n.pid, addr, verdict.reason)
    return Errno(verdict.errno)


#: include/net/tcp_states.h: a socket neither connected, connecting nor listening.
_TCP_CLOSE = 7


def _engaged(sock: _socket.socket) -> bool:
    """Whether the TCP socket *sock* is connected, connecting or listening
    (a connect then fails, or waits, whatever its address); False where it
    cannot be told."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except OSError:
        return False
    return bool(state) and state[0] != _TCP_CLOSE


def _as_socket(fd: int) -> _socket.socket:
    """A socket object owning *fd*; Errno (ENOTSOCK) if it is no socket, and
    then *fd* is still the caller's to close."""
    try:
        return _socket.socket(fileno=fd)
    except OSError as exc:
        raise Errno(exc.errno or errno.ENOTSOCK) from None


def _set_nonblocking(fd: int, on: bool) -> None:
    """O_NONBLOCK exactly as asked (a kept connection may carry an earlier ask)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    wanted = flags | os.O_NONBLOCK if on else flags & ~os.O_NONBLOCK
    if wanted != flags:
        fcntl.fcntl(fd, fcntl.F_SETFL, wanted)


def _accept_nonblocking(fd: int, flags: int) -> tuple[int, bytes]:
    """``accept4`` that never blocks, even on a blocking listener; raises OSError.

    Every ``accept`` of the app on a virtual listener comes through here, so no
    app thread can observe the flag while it is flipped.
    """
    if flags & os.O_NONBLOCK:
        return _raw.accept4(fd, socket.SOCK_CLOEXEC)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        return _raw.accept4(fd, socket.SOCK_CLOEXEC)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _finish_connect(sock: _socket.socket, target: bytes, flags: int) -> int:
    """End a TCP connect the app waited in (see ``Engine._connected``); 0 or the errno.

    Another thread of the app may have shut the socket down meanwhile
    (``shutdown``): the kernel wakes the waiting connect, which finds the
    socket closed and fails with its error (ECONNRESET).  Connecting once
    more to *target* would instead start a new handshake behind the app's
    back.  So the connect once more names an address of the other family
    (at the full length of a ``sockaddr_in6``, which SELinux and Landlock
    check before the socket layer does): a socket still connecting never
    looks at the address, and one that is not any more fails with
    EAFNOSUPPORT before it sends anything.

    Two threads may wait in connect on one socket: the kernel ends both
    with 0 once it is connected.  Here the first one's connect once more
    marks it connected, and the other's then finds it so (EISCONN): 0 too.
    Where the handshake failed, the first takes the error and the other
    finds none left: EPIPE, as the kernel's (6.6 and later) for a connect
    whose socket was disconnected while it waited.  A connect to
    ``AF_UNSPEC`` from another thread gets that EPIPE natively, but here
    the error it leaves (ECONNRESET), as after a ``shutdown``.
    """
    fd = sock.fileno()
    if sock.family not in (_AF_INET, _AF_INET6) or len(target) < 2:
        err = _connect_nonblocking(fd, target, flags)
        return 0 if err == errno.EISCONN else err
    other = _AF_INET6 if sock.family == _AF_INET else _AF_INET
    elsewhere = (struct.pack("=H", other) + target[2:]).ljust(_SOCKADDR_IN6_LEN, b"\0")
    err = _connect_nonblocking(fd, elsewhere, flags)
    if err == errno.EISCONN:
        return 0
    if err != errno.EAFNOSUPPORT:
        return err
    pending: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # taken, as the kernel does
    return pending or errno.EPIPE


def _connect_nonblocking(fd: int, target: bytes, flags: int) -> int:
    """``connect`` that never blocks, even on a blocking socket; 0 or the errno.

    ``O_NONBLOCK`` lives in the file description shared with the app, whose
    thread is parked in this very connect; it is back before we answer.
    """
    if flags & os.O_NONBLOCK:
        return _raw.connect(fd, target)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        return _raw.connect(fd, target)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
