"""The notification engine: an app's trapped socket calls, carried out on its behalf.

Theory of operation
-------------------
The seccomp filter (``_bpf``) sends ``connect``, ``bind``, ``listen``,
``accept``/``accept4``, ``getsockname`` and ``getpeername`` here.  For each
notification the engine

1. opens a pidfd for the calling thread and takes a duplicate of the socket
   with ``pidfd_getfd`` — the *same* open file description the app holds, so
   socket options, ``O_NONBLOCK`` and epoll registrations stay the app's own;
2. copies any sockaddr argument into private memory, then checks with
   ``SECCOMP_IOCTL_NOTIF_ID_VALID`` that the notification is still live.  A
   live notification means the thread is still blocked in the call, so the pid
   was not reused and the copy came from the right address space;
3. decides from the private copy (``axnet._verdict``) and acts on the
   duplicate: connects it, binds it, listens on it, accepts from it;
4. answers with the result.  ``SECCOMP_USER_NOTIF_FLAG_CONTINUE`` is used only
   where nothing the app can still change entered the decision (``accept`` and
   ``getsockname``/``getpeername`` on sockets that are not virtual).  Writing a
   result into the app (accept's peer address, getsockname's address) goes
   through ``/proc/TID/mem`` opened *before* the validity check, so a reused pid
   can never receive the bytes.

The loop runs in one dedicated OS thread that blocks in ``poll``+``RECV``: a
trio wake-up per notification would cost more than the whole decision.
Anything that would block — a blocking ``connect`` still in progress, a
blocking ``accept`` with no connection queued — is handed to a worker thread
that waits for readiness, re-checking every ``_WAIT_SLICE`` that the app is
still waiting (a signal may have interrupted it), so one slow call stalls
neither the loop nor the app's other threads.  A connection accepted for an
``accept`` that was interrupted is kept and handed to the next ``accept`` on
the same listener: it is never lost.

A blocking app socket is connected by flipping ``O_NONBLOCK`` on for the one
``connect`` call and back off: the flag lives in the shared file description,
but the app's thread is parked in this very syscall.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from .._node import ClaimError
from .._table import IPAddress, RealAddress, ServiceTable, VirtualAddress, ip_address
from .._verdict import (
    BindVirtual,
    Deny,
    Identity,
    Passthrough,
    Redirect,
    decide_bind,
    decide_connect,
)
from . import _raw
from ._decode import (
    MAX_SOCKADDR_LEN,
    Inet4,
    Inet6,
    SockaddrError,
    decode_sockaddr,
    encode_sockaddr,
)
from ._libc import PIDFD_THREAD, Notification, NotifyFd, pidfd_getfd, pidfd_open, read_memory

log = logging.getLogger("axnet.run")

# x86_64 syscall numbers of the trapped calls.
NR_CONNECT = 42
NR_ACCEPT = 43
NR_BIND = 49
NR_LISTEN = 50
NR_GETSOCKNAME = 51
NR_GETPEERNAME = 52
NR_ACCEPT4 = 288

#: setsockopt(IPPROTO_IP, IP_LOCAL_PORT_RANGE): lo | hi << 16 (Linux 6.3).
IP_LOCAL_PORT_RANGE = 51
#: How often a worker waiting on behalf of the app re-checks that the app still waits.
_WAIT_SLICE_S = 0.2
#: pidfds kept for threads seen recently (one fd each).
MAX_CACHED_PIDFDS = 256
#: How often bindings are checked for sockets the app closed.
SWEEP_INTERVAL_S = 1.0
_INT32 = struct.Struct("=i")
_UINT32 = struct.Struct("=I")
_ACCEPT4_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_INET = (socket.AF_INET, socket.AF_INET6)


class NodeLink(Protocol):
    """How the engine claims virtual ports from the node (the supervisor implements it)."""

    def claim(self, virtual: VirtualAddress, avoid: Sequence[int]) -> tuple[int, int]:
        """Return (real port, virtual port); real port 0 means "let the kernel pick"."""
        ...

    def listen(self, virtual: VirtualAddress) -> None: ...
    def release(self, virtual: VirtualAddress) -> None: ...


class Errno(Exception):
    """Answer the notification with this errno."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


class Gone(Exception):
    """The notification is no longer valid: the thread died or was interrupted."""


@attrs.define
class Binding:
    """A socket of the app bound to its virtual address."""

    virtual: VirtualAddress
    real_port: int
    inode: int
    #: A thread of the process that bound it, to find the socket in its fd table.
    pid: int = 0
    listening: bool = False


@attrs.define
class Counters:
    notifications: int = 0
    redirected: int = 0
    refused: int = 0
    passed: int = 0
    deferred: int = 0
    faults: int = 0
    errors: int = 0


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _open_pidfd(tid: int) -> int:
    try:
        return pidfd_open(tid, PIDFD_THREAD)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    # Kernels before 6.9 know no thread pidfds: open the thread group leader.
    with open(f"/proc/{tid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"Tgid:"):
                return pidfd_open(int(line.split()[1]))
    raise OSError(errno.ESRCH, os.strerror(errno.ESRCH))


def _wait_fd(fd: int, events: int, timeout_ms: int) -> bool:
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(timeout_ms))


def _sockaddr_for(family: int, ip: IPAddress, port: int) -> bytes:
    """Encode ``ip:port`` for a socket of *family* (v4 in a v6 socket is mapped)."""
    if family == socket.AF_INET6:
        if ip.version == 4:
            return encode_sockaddr(Inet6(host=_mapped(ip), port=port))
        return encode_sockaddr(Inet6(host=ip, port=port))  # type: ignore[arg-type]  # version checked
    if ip.version == 6:
        raise Errno(errno.ENETUNREACH)
    return encode_sockaddr(Inet4(host=ip, port=port))  # type: ignore[arg-type]  # version checked


def _mapped(ip: IPAddress) -> object:
    import ipaddress

    return ipaddress.IPv6Address(f"::ffff:{ip}")


def _unmapped(addr: Inet4 | Inet6) -> IPAddress:
    return ip_address(addr.host)


def _peer_tuple(address: object) -> tuple[IPAddress, int] | None:
    """(ip, port) from a Python socket address tuple, unmapped."""
    if isinstance(address, tuple) and len(address) >= 2:
        try:
            return ip_address(str(address[0])), int(address[1])
        except ValueError:
            return None
    return None


class Engine:
    """Answers the notifications of one app (all its processes and threads)."""

    def __init__(
        self,
        notify: NotifyFd,
        *,
        identity: Identity,
        table: ServiceTable,
        node: NodeLink,
    ) -> None:
        self.notify = notify
        self.identity = identity
        self.table = table
        self.node = node
        self.bindings: dict[int, Binding] = {}
        self.counters = Counters()
        self._pending: dict[int, collections.deque[int]] = {}
        self._reply_lock = threading.Lock()
        self._bindings_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._epoll = select.epoll()
        self._waiters: dict[int, _Waiter] = {}
        self._pidfds: dict[int, int] = {}
        self._handlers: dict[int, Callable[[Notification], None]] = {
            NR_CONNECT: self._on_connect,
            NR_BIND: self._on_bind,
            NR_LISTEN: self._on_listen,
            NR_ACCEPT: self._on_accept,
            NR_ACCEPT4: self._on_accept,
            NR_GETSOCKNAME: self._on_getname,
            NR_GETPEERNAME: self._on_getname,
        }

    # -- loop -----------------------------------------------------------------

    def serve(self) -> None:
        """Answer notifications until :meth:`stop` or until no target is left."""
        nfd = self.notify.fileno()
        try:
            # Hand the CPU straight between the app and this thread (Linux 6.6).
            self.notify.set_sync_wakeup()
        except OSError:
            pass
        self._epoll.register(nfd, select.EPOLLIN)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        next_check = 0.0
        try:
            while not self._stopping:
                timeout = _WAIT_SLICE_S if self._waiters else SWEEP_INTERVAL_S
                for fd, events in self._epoll.poll(timeout):
                    if fd == nfd:
                        if events & select.EPOLLIN:
                            self._serve_one()
                        elif events & (select.EPOLLHUP | select.EPOLLERR):
                            return  # every filtered task is gone
                    elif fd == self._wake_r:
                        return
                    else:
                        self._wake_waiter(fd)
                now = time.monotonic()
                if self._waiters and now >= next_check:
                    next_check = now + _WAIT_SLICE_S
                    self._drop_abandoned_waiters()
                if now >= next_sweep:
                    next_sweep = now + SWEEP_INTERVAL_S
                    self.sweep()
        finally:
            for waiter in list(self._waiters.values()):
                self._unwait(waiter)
            for pidfd in self._pidfds.values():
                os.close(pidfd)
            self._pidfds.clear()
            self._epoll.close()

    def stop(self) -> None:
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _serve_one(self) -> None:
        try:
            n = self.notify.recv()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):
                return  # the task died between the wake-up and RECV
            raise
        self.counters.notifications += 1
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
            pass
        except Exception:
            self.counters.errors += 1
            log.exception("engine error nr=%s pid=%s", n.nr, n.pid)
            self._reply(n, error=errno.EIO)

    # -- waiting without blocking the loop -----------------------------------------

    def _wait(self, n: Notification, sock: socket.socket, events: int,
              then: Callable[[Notification, socket.socket], None]) -> None:
        """Call ``then(n, sock)`` once *sock* is ready; the app stays parked meanwhile."""
        self.counters.deferred += 1
        waiter = _Waiter(n=n, sock=sock, then=then)
        self._waiters[sock.fileno()] = waiter
        self._epoll.register(sock.fileno(), events | select.EPOLLONESHOT)

    def _unwait(self, waiter: _Waiter) -> None:
        fd = waiter.sock.fileno()
        self._waiters.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        waiter.sock.close()

    def _wake_waiter(self, fd: int) -> None:
        waiter = self._waiters.pop(fd, None)
        if waiter is None:
            return
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        # The step owns the socket from here: it closes it, or waits again.
        self._guarded(waiter.n, waiter.then, waiter.n, waiter.sock)

    def _drop_abandoned_waiters(self) -> None:
        """Forget waits whose app thread was killed (nobody to answer any more)."""
        for waiter in list(self._waiters.values()):
            if not self._valid(waiter.n):
                self._unwait(waiter)

    # -- answers --------------------------------------------------------------

    def _reply(self, n: Notification, *, value: int = 0, error: int = 0) -> None:
        with self._reply_lock:
            try:
                self.notify.respond(n.id, val=value, error=error)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise

    def _continue(self, n: Notification) -> None:
        with self._reply_lock:
            try:
                self.notify.respond_continue(n.id)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise

    def _valid(self, n: Notification) -> bool:
        # NotifyFd reuses one argument buffer per ioctl: one thread at a time.
        with self._reply_lock:
            return self.notify.id_valid(n.id)

    def _check(self, n: Notification) -> None:
        if not self._valid(n):
            raise Gone

    # -- reaching into the app --------------------------------------------------

    def _socket(self, n: Notification) -> socket.socket:
        """Our duplicate of the app's socket ``args[0]``."""
        target = _int32(n.args[0])
        if target < 0:
            raise Errno(errno.EBADF)
        fd = self._getfd(n.pid, target)
        try:
            return socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise Errno(
                errno.ENOTSOCK if exc.errno == errno.ENOTSOCK else exc.errno or errno.EBADF
            ) from None

    def _getfd(self, tid: int, target: int) -> int:
        """``pidfd_getfd`` through a cached pidfd of thread *tid*.

        A cached pidfd names one task for its whole life, so it can be stale
        (the thread died, the tid was reused) but never wrong: a stale one
        fails with ESRCH and is replaced once.
        """
        for attempt in (0, 1):
            pidfd = self._pidfds.get(tid)
            if pidfd is None:
                try:
                    pidfd = _open_pidfd(tid)
                except OSError:
                    raise Gone from None
                if len(self._pidfds) >= MAX_CACHED_PIDFDS:
                    for old in self._pidfds.values():
                        os.close(old)
                    self._pidfds.clear()
                self._pidfds[tid] = pidfd
            try:
                return pidfd_getfd(pidfd, target)
            except OSError as exc:
                if exc.errno == errno.ESRCH and attempt == 0:
                    os.close(self._pidfds.pop(tid))
                    continue
                if exc.errno == errno.ESRCH:
                    raise Gone from None
                raise Errno(exc.errno or errno.EBADF) from None
        raise Gone

    def _read_sockaddr(self, n: Notification, ptr: int, length: int) -> bytes:
        if length > MAX_SOCKADDR_LEN:
            raise Errno(errno.EINVAL)
        if length == 0:
            return b""
        try:
            return read_memory(n.pid, ptr, length)
        except OSError:
            self.counters.faults += 1
            raise Errno(errno.EFAULT) from None

    def _open_mem(self, n: Notification) -> int:
        """``/proc/TID/mem`` for writing results, opened before the validity check."""
        try:
            fd = os.open(f"/proc/{n.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            raise Gone from None
        if not self._valid(n):
            os.close(fd)
            raise Gone
        return fd

    def _write_sockaddr(self, mem: int, addr_ptr: int, len_ptr: int, encoded: bytes) -> None:
        """Store a result address the way the kernel does (truncate, report full length)."""
        if not addr_ptr or not len_ptr:
            return
        try:
            raw_len = os.pread(mem, 4, len_ptr)
            if len(raw_len) != 4:
                raise Errno(errno.EFAULT)
            (room,) = _INT32.unpack(raw_len)
            if room < 0:
                raise Errno(errno.EINVAL)
            if room:
                os.pwrite(mem, encoded[:room], addr_ptr)
            os.pwrite(mem, _INT32.pack(len(encoded)), len_ptr)
        except OSError:
            self.counters.faults += 1
            raise Errno(errno.EFAULT) from None

    # -- connect ---------------------------------------------------------------

    def _on_connect(self, n: Notification) -> None:
        length = n.args[2] & 0xFFFFFFFF
        if length > MAX_SOCKADDR_LEN:
            raise Errno(errno.EINVAL)
        sock = self._socket(n)
        try:
            raw = self._read_sockaddr(n, n.args[1], length)
            self._check(n)
            target = raw
            pinned = False
            if sock.type == socket.SOCK_STREAM and sock.family in _INET:
                try:
                    addr = decode_sockaddr(raw)
                except SockaddrError as exc:
                    raise Errno(exc.errno) from None
                if _family_matches(sock.family, addr):
                    assert isinstance(addr, Inet4 | Inet6)
                    ip = _unmapped(addr)
                    verdict = decide_connect(self.table, self.identity, ip, addr.port)
                    match verdict:
                        case Deny():
                            self.counters.refused += 1
                            log.info(
                                "connect refused pid=%s dest=%s:%s reason=%s",
                                n.pid,
                                ip,
                                addr.port,
                                verdict.reason,
                            )
                            raise Errno(verdict.errno)
                        case Redirect():
                            self.counters.redirected += 1
                            target = _sockaddr_for(
                                sock.family, verdict.real.host, verdict.real.port
                            )
                            pinned = self._pin_source_ports(sock)
                            log.debug(
                                "connect pid=%s virtual=%s real=%s",
                                n.pid,
                                verdict.service,
                                verdict.real,
                            )
                        case Passthrough():
                            self.counters.passed += 1
            self._connect(n, sock, target, pinned=pinned)
            sock = None  # type: ignore[assignment]  # ownership passed on
        finally:
            if sock is not None:
                sock.close()

    def _pin_source_ports(self, sock: socket.socket) -> bool:
        """Keep the source port in the app's block, so servers can name the client."""
        block = self.identity.block
        if block is None:
            return False
        try:
            sock.setsockopt(
                socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, _UINT32.pack(block[0] | block[1] << 16)
            )
        except OSError as exc:
            log.debug("IP_LOCAL_PORT_RANGE unavailable: %s", exc)
            return False
        return True

    def _connect(
        self, n: Notification, sock: socket.socket, target: bytes, *, pinned: bool = False
    ) -> None:
        """Connect the app's socket with blocking semantics preserved; closes *sock*."""
        fd = sock.fileno()
        err = _connect_nonblocking(fd, target)
        if pinned and err == errno.EADDRNOTAVAIL:
            log.warning(
                "client port block %s exhausted; connecting from any port "
                "(the server sees the node's address, not the app's)",
                self.identity.block,
            )
            sock.setsockopt(socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, _UINT32.pack(0))
            err = _connect_nonblocking(fd, target)
        blocking = not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        if blocking and err in (errno.EINPROGRESS, errno.EALREADY):
            if not _wait_fd(fd, select.POLLOUT, 0):
                self._wait(n, sock, select.EPOLLOUT, self._connected)
                return
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        sock.close()
        self._reply(n, error=err)

    def _connected(self, n: Notification, sock: socket.socket) -> None:
        """A deferred blocking connect finished (or failed)."""
        try:
            self._reply(n, error=sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
        finally:
            sock.close()

    # -- bind / listen -----------------------------------------------------------

    def _on_bind(self, n: Notification) -> None:
        length = n.args[2] & 0xFFFFFFFF
        if length > MAX_SOCKADDR_LEN:
            raise Errno(errno.EINVAL)
        with self._socket(n) as sock:
            raw = self._read_sockaddr(n, n.args[1], length)
            self._check(n)
            if sock.type == socket.SOCK_STREAM and sock.family in _INET:
                try:
                    addr = decode_sockaddr(raw)
                except SockaddrError as exc:
                    raise Errno(exc.errno) from None
                if _family_matches(sock.family, addr):
                    assert isinstance(addr, Inet4 | Inet6)
                    ip = _unmapped(addr)
                    verdict = decide_bind(
                        self.table,
                        self.identity,
                        ip,
                        addr.port,
                        ipv6_socket=sock.family == socket.AF_INET6,
                        v6only=sock.family == socket.AF_INET6
                        and bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)),
                    )
                    match verdict:
                        case Deny():
                            log.info(
                                "bind refused pid=%s addr=%s:%s reason=%s",
                                n.pid,
                                ip,
                                addr.port,
                                verdict.reason,
                            )
                            raise Errno(verdict.errno)
                        case BindVirtual():
                            self._bind_virtual(sock, verdict.port, n.pid)
                            self._reply(n)
                            return
                        case Passthrough():
                            pass
            self._reply(n, error=_raw.bind(sock.fileno(), raw))

    def _bind_virtual(self, sock: socket.socket, port: int, pid: int) -> Binding:
        """Claim ``vip:port`` and bind the socket to a real port; raises Errno."""
        if sock.getsockname()[1] != 0:
            raise Errno(errno.EINVAL)  # already bound, as the kernel says
        virtual = VirtualAddress(ip=self.identity.vip, port=port)
        avoid: list[int] = []
        for _ in range(8):
            try:
                real_port, vport = self.node.claim(virtual, avoid)
            except ClaimError as exc:
                log.info("bind refused addr=%s reason=%s", virtual, exc)
                raise Errno(exc.errno) from None
            claimed = VirtualAddress(ip=self.identity.vip, port=vport)
            err = _raw.bind(
                sock.fileno(), _sockaddr_for(sock.family, self.identity.real_host, real_port)
            )
            if err == 0:
                if real_port == 0:
                    real_port = int(sock.getsockname()[1])
                    if vport == 0:
                        claimed = VirtualAddress(ip=self.identity.vip, port=real_port)
                binding = Binding(
                    virtual=claimed,
                    real_port=real_port,
                    inode=os.fstat(sock.fileno()).st_ino,
                    pid=pid,
                )
                with self._bindings_lock:
                    self.bindings[real_port] = binding
                log.debug("bind virtual=%s real=%s:%s", claimed, self.identity.real_host, real_port)
                return binding
            self.node.release(claimed)
            if err != errno.EADDRINUSE:
                raise Errno(err)
            avoid.append(real_port)  # taken by a process outside axnet
        raise Errno(errno.EADDRINUSE)

    def _binding_of(self, sock: socket.socket) -> Binding | None:
        """The virtual binding behind *sock*, if it is one of ours."""
        if sock.type != socket.SOCK_STREAM or sock.family not in _INET:
            return None
        try:
            local = _peer_tuple(sock.getsockname())
        except OSError:
            return None
        if local is None or local[0] != self.identity.real_host:
            return None
        return self.bindings.get(local[1])

    def _on_listen(self, n: Notification) -> None:
        backlog = _int32(n.args[1])
        with self._socket(n) as sock:
            self._check(n)
            binding = self._binding_of(sock)
            if (
                binding is None
                and sock.type == socket.SOCK_STREAM
                and sock.family in _INET
                and sock.getsockname()[1] == 0
            ):
                # listen() on an unbound socket binds it to any port first.
                binding = self._bind_virtual(sock, 0, n.pid)
            try:
                sock.listen(backlog)
            except OSError as exc:
                raise Errno(exc.errno or errno.EINVAL) from None
            if binding is not None and binding.inode == os.fstat(sock.fileno()).st_ino:
                if not binding.listening:
                    binding.listening = True
                    try:
                        self.node.listen(binding.virtual)
                    except ClaimError as exc:
                        log.warning("publish failed service=%s reason=%s", binding.virtual, exc)
                    log.info(
                        "listening service=%s real=%s:%s",
                        binding.virtual,
                        self.identity.real_host,
                        binding.real_port,
                    )
            self._reply(n)

    # -- accept ------------------------------------------------------------------

    def _on_accept(self, n: Notification) -> None:
        flags = _int32(n.args[3]) if n.nr == NR_ACCEPT4 else 0
        sock = self._socket(n)
        try:
            binding = self._binding_of(sock)
            if binding is None:
                self._continue(n)
                return
            if flags & ~_ACCEPT4_FLAGS:
                raise Errno(errno.EINVAL)
            pending = self._pending.get(binding.real_port)
            if pending:
                self._deliver(n, sock, pending.popleft(), flags, binding)
                return
            self._accept(n, sock, flags, binding)
            sock = None  # type: ignore[assignment]  # _accept owns it
        finally:
            if sock is not None:
                sock.close()

    def _accept(self, n: Notification, sock: socket.socket, flags: int, binding: Binding) -> None:
        """Accept one connection for the app, or wait for one; owns *sock*."""
        fd = sock.fileno()
        app_flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            conn = _accept_nonblocking(fd, app_flags)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) and not app_flags & os.O_NONBLOCK:
                self._wait(
                    n, sock, select.EPOLLIN,
                    lambda n2, s2: self._accept(n2, s2, flags, binding),
                )
                return
            sock.close()
            raise Errno(exc.errno or errno.EIO) from None
        try:
            self._deliver(n, sock, conn, flags, binding)
        finally:
            sock.close()

    def _deliver(
        self, n: Notification, listener: socket.socket, conn: int, flags: int, binding: Binding
    ) -> None:
        """Hand an accepted connection to the app: peer address, then the fd itself."""
        try:
            addr_ptr, len_ptr = n.args[1], n.args[2]
            if addr_ptr and len_ptr:
                mem = self._open_mem(n)
                try:
                    peer = self._virtual_peer(conn)
                    encoded = _sockaddr_for(listener.family, peer[0], peer[1])
                    self._write_sockaddr(mem, addr_ptr, len_ptr, encoded)
                finally:
                    os.close(mem)
            if flags & socket.SOCK_NONBLOCK:
                fcntl.fcntl(conn, fcntl.F_SETFL, fcntl.fcntl(conn, fcntl.F_GETFL) | os.O_NONBLOCK)
            with self._reply_lock:
                self.notify.addfd(n.id, conn, send=True, cloexec=bool(flags & socket.SOCK_CLOEXEC))
        except (Gone, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno != errno.ENOENT:
                os.close(conn)
                raise
            # The app stopped waiting (signal): keep the connection for the next accept.
            self._pending.setdefault(binding.real_port, collections.deque()).append(conn)
            return
        except Errno:
            os.close(conn)  # as the kernel does when it cannot store the address
            raise
        os.close(conn)

    def _virtual_peer(self, conn: int) -> tuple[IPAddress, int]:
        with socket.socket(fileno=os.dup(conn)) as s:
            peer = _peer_tuple(s.getpeername())
        if peer is None:
            raise Errno(errno.ENOTCONN)
        vip = self.table.virtual_of_client(peer[0], peer[1])
        return (vip, peer[1]) if vip is not None else peer

    # -- getsockname / getpeername ------------------------------------------------

    def _on_getname(self, n: Notification) -> None:
        with self._socket(n) as sock:
            if sock.type != socket.SOCK_STREAM or sock.family not in _INET:
                self._continue(n)
                return
            try:
                if n.nr == NR_GETSOCKNAME:
                    virtual = self._virtual_local(sock)
                else:
                    virtual = self._virtual_remote(sock)
            except OSError as exc:
                raise Errno(exc.errno or errno.EINVAL) from None
            if virtual is None:
                self._continue(n)
                return
            mem = self._open_mem(n)
            try:
                self._write_sockaddr(
                    mem, n.args[1], n.args[2], _sockaddr_for(sock.family, virtual[0], virtual[1])
                )
            finally:
                os.close(mem)
            self._reply(n)

    def _virtual_local(self, sock: socket.socket) -> tuple[IPAddress, int] | None:
        local = _peer_tuple(sock.getsockname())
        if local is None or local[0] != self.identity.real_host:
            return None
        binding = self.bindings.get(local[1])
        if binding is not None:
            return binding.virtual.ip, binding.virtual.port
        block = self.identity.block
        if block is not None and block[0] <= local[1] <= block[1]:
            return self.identity.vip, local[1]
        return None

    def _virtual_remote(self, sock: socket.socket) -> tuple[IPAddress, int] | None:
        peer = _peer_tuple(sock.getpeername())
        if peer is None:
            return None
        server = self.table.virtual_of_server(RealAddress(host=peer[0], port=peer[1]))
        if server is not None:
            return server.ip, server.port
        vip = self.table.virtual_of_client(peer[0], peer[1])
        if vip is not None:
            return vip, peer[1]
        return None

    # -- housekeeping --------------------------------------------------------------

    def sweep(self) -> None:
        """Withdraw bindings whose socket the app has closed."""
        if not self.bindings:
            return
        alive = _socket_inodes()
        with self._bindings_lock:
            gone = [
                b
                for b in self.bindings.values()
                if b.inode not in alive and (b.listening or not _holds_inode(b.pid, b.inode))
            ]
            for binding in gone:
                del self.bindings[binding.real_port]
                for conn in self._pending.pop(binding.real_port, ()):
                    os.close(conn)
        for binding in gone:
            log.info("released service=%s listening=%s", binding.virtual, binding.listening)
            try:
                self.node.release(binding.virtual)
            except ClaimError as exc:
                log.warning("release failed service=%s reason=%s", binding.virtual, exc)

    def snapshot_bindings(self) -> list[Binding]:
        with self._bindings_lock:
            return list(self.bindings.values())


def _accept_nonblocking(fd: int, flags: int) -> int:
    """``accept4`` that never blocks, even on a blocking listener; raises OSError.

    Every ``accept`` of the app on a virtual listener comes through here, so no
    app thread can observe the flag while it is flipped.
    """
    if flags & os.O_NONBLOCK:
        return _raw.accept4(fd, socket.SOCK_CLOEXEC)[0]
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        return _raw.accept4(fd, socket.SOCK_CLOEXEC)[0]
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


@attrs.define
class _Waiter:
    n: Notification
    sock: socket.socket
    then: Callable[[Notification, socket.socket], None]


def _connect_nonblocking(fd: int, target: bytes) -> int:
    """``connect`` that never blocks, even on a blocking socket; 0 or the errno.

    ``O_NONBLOCK`` lives in the file description shared with the app, whose
    thread is parked in this very connect; it is back before we answer.
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_NONBLOCK:
        return _raw.connect(fd, target)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        return _raw.connect(fd, target)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _family_matches(family: int, addr: object) -> bool:
    return (family == socket.AF_INET and isinstance(addr, Inet4)) or (
        family == socket.AF_INET6 and isinstance(addr, Inet6)
    )


def _holds_inode(pid: int, inode: int) -> bool:
    """Whether process *pid* still has socket *inode* open (bound, not listening)."""
    wanted = f"socket:[{inode}]"
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}") == wanted:
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def _socket_inodes() -> set[int]:
    """Inodes of TCP sockets that listen or are connected, in this namespace.

    A socket that is only bound appears in neither table.
    """
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, "rb") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9:
                        inodes.add(int(fields[9]))
        except FileNotFoundError:
            continue
    return inodes
