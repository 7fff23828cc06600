"""Parked calls: the app's blocking calls that wait, in the engine thread, for their socket.

Theory of operation
-------------------
A call that would block — a blocking ``connect`` still in progress, a
blocking ``accept`` with nothing queued — is started without blocking by the
engine, and its socket (our duplicate of the app's) joins the epoll set kept
here; the app's thread stays parked in the call until the socket is ready.
The engine's loop watches that epoll set as one more fd and calls
:meth:`ParkedCalls.wake_waiters` when it is readable.

Waits are re-checked every ``WAIT_SLICE_S``: a wait whose thread was killed is
dropped, and one whose thread has a signal to take (``_tasks.SignalTargets``:
one sent to the whole process goes to one thread) is answered
``ERESTARTSYS``, so the kernel runs the handler and restarts the call or fails
it with EINTR, as it would for a blocking call of its own (a parked thread
waits killably, see ``_libc``); one whose socket timeout ran out gets the
kernel's answer for that (EAGAIN, EINPROGRESS).  Timeouts are therefore kept
to within a slice.  A blocking ``connect`` of a Unix socket to a listener
whose backlog is full, which the kernel would sleep in until there is room, is
tried again every slice: no fd tells us when there is.  The calls the native
fast path (``_fastpath.c``) parks itself are checked the same way, at the same
time.
"""

from __future__ import annotations

import _socket
import errno
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import attrs

from ._bpf import NR_CONNECT
from ._libc import ERESTARTSYS, Notification, NotifyFd
from ._tasks import SignalTargets

if TYPE_CHECKING:
    from ._fastpath import Fast

#: How often parked waits are checked for threads that went away or have a
#: signal to take, and for socket timeouts, in seconds (their granularity).
WAIT_SLICE_S = 0.2
#: A check reads each parked thread's /proc status: with thousands parked
#: one takes a good part of a second, and the engine's time goes to checks
#: alone.  So the next starts no sooner than this many times its length
#: after the last began: checks take at most a fifth of the engine's time.
CHECK_SPACING = 5


def next_check(began: float, ended: float) -> float:
    """When the check after one that ran from *began* to *ended* is due."""
    return began + max(WAIT_SLICE_S, CHECK_SPACING * (ended - began))


_TIMEVAL = struct.Struct("@ll")


class ParkedCounts(Protocol):
    """The engine's counters that parked calls add to."""

    deferred: int
    interrupted: int


@attrs.define
class _Waiter:
    n: Notification
    sock: _socket.socket
    then: Callable[[Notification, _socket.socket], None]
    #: When the call started waiting (monotonic): its socket timeout counts from here.
    since: float
    #: Its socket timeout (SO_SNDTIMEO for a connect, SO_RCVTIMEO for an
    #: accept) in seconds, 0 for none, as it was then: the kernel reads it
    #: once, when the call starts, so a later change leaves the call alone.
    timeout: float = 0.0
    #: The socket's inode: accepts waiting on one listener share it.
    inode: int = 0
    #: A connect's answer when its socket timeout runs out: what the
    #: connect said when it started waiting (EINPROGRESS; EALREADY for a
    #: socket that was connecting already), as the kernel answers.
    timed_out: int = errno.EINPROGRESS
    #: The epoll events it waits for (to arm it again).
    events: int = 0


class ParkedCalls:
    """The calls of one app parked until their socket is ready (or their
    thread goes away, takes a signal, or runs out of socket timeout)."""

    def __init__(
        self,
        notify: NotifyFd,
        counters: ParkedCounts,
        fast: Fast | None,
        *,
        run: Callable[..., None],
        reply: Callable[..., None],
    ) -> None:
        """*run* ``(n, step, *args)`` runs a step of answering *n* so that every
        failure still answers it; *reply* ``(n, error=...)`` answers *n*."""
        self._notify = notify
        self._counters = counters
        self._fast = fast
        self._run = run
        self._reply = reply
        self._epoll = select.epoll()
        #: The epoll set of the waits, which the engine's loop watches.
        self.epoll_fd = self._epoll.fileno()
        #: Waits by our fd.  Read by the engine's loop at every turn (a
        #: dictionary's truth costs less than a call).
        self.waiters: dict[int, _Waiter] = {}
        #: Waits nothing can signal, tried again at every check (by our fd).
        self.retries: dict[int, _Waiter] = {}
        self._rewait_since: float | None = None
        self._rewait_timeout = 0.0
        self._signals = SignalTargets()

    def waiting(self) -> bool:
        """Whether a call is held for the app (its timeout and signals checked)."""
        return (
            bool(self.waiters)
            or bool(self.retries)
            or (self._fast is not None and self._fast.parked > 0)
        )

    def close(self) -> None:
        """Drop every wait (nobody is answered: the engine is done)."""
        for waiter in [*self.waiters.values(), *self.retries.values()]:
            self._unwait(waiter)
        self._epoll.close()

    def drop_gone(self) -> bool:
        """Forget the waits whose app thread is gone now, not at the next
        check: an exec ends every other thread of the app, and the sockets
        of their waits, closed on exec, live on in our duplicates (a new
        image binding the same address found it in use).  Whether any was."""
        dropped = False
        if self._fast is not None and self._fast.parked:
            before = self._fast.parked
            dropped = self._fast.drop_abandoned() < before
        for waiter in [*self.waiters.values(), *self.retries.values()]:
            if not self._notify.id_valid(waiter.n.id):
                self._unwait(waiter)
                dropped = True
        return dropped

    def wait(
        self,
        n: Notification,
        sock: _socket.socket,
        events: int,
        then: Callable[[Notification, _socket.socket], None],
        *,
        timed_out: int = errno.EINPROGRESS,
    ) -> None:
        """Call ``then(n, sock)`` once *sock* is ready; the app stays parked
        meanwhile (a connect's answer if its SO_SNDTIMEO runs out first: *timed_out*)."""
        self._counters.deferred += 1
        since, timeout = self._started(n, sock)
        inode = os.fstat(sock.fileno()).st_ino
        events |= select.EPOLLONESHOT
        self.waiters[sock.fileno()] = _Waiter(
            n=n,
            sock=sock,
            then=then,
            since=since,
            timeout=timeout,
            inode=inode,
            timed_out=timed_out,
            events=events,
        )
        self._epoll.register(sock.fileno(), events)

    def retry(
        self,
        n: Notification,
        sock: _socket.socket,
        then: Callable[[Notification, _socket.socket], None],
    ) -> None:
        """Call ``then(n, sock)`` again at the next check of waits (every
        ``WAIT_SLICE_S``): a wait no fd can signal.  Checked like the others."""
        self._counters.deferred += 1
        since, timeout = self._started(n, sock)
        self.retries[sock.fileno()] = _Waiter(
            n=n, sock=sock, then=then, since=since, timeout=timeout
        )

    def _started(self, n: Notification, sock: _socket.socket) -> tuple[float, float]:
        """When the call *n* on *sock* started waiting, and its socket timeout
        then: now and the socket's, or those of the wait it goes on with."""
        if self._rewait_since is not None:
            return self._rewait_since, self._rewait_timeout
        option = socket.SO_SNDTIMEO if n.nr == NR_CONNECT else socket.SO_RCVTIMEO
        return time.monotonic(), _timeout(sock, option)

    def _unwait(self, waiter: _Waiter) -> None:
        fd = waiter.sock.fileno()
        self.waiters.pop(fd, None)
        self.retries.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        waiter.sock.close()

    def wake_waiters(self) -> None:
        """Go on with the waits whose socket is ready (the epoll set is readable)."""
        # Of the accepts blocked on one listener, the kernel hands a
        # connection to the one that has waited longest.  A listener wakes
        # our duplicates in an order of its own (every one of them, for one
        # connection), and this loop may look before it has woken them all:
        # the waiters on a ready socket go oldest first, until one finds
        # nothing queued and waits again.  The rest wait on, armed again
        # where the listener woke them: one connection costs one accept, not
        # one per thread blocked in accept.
        ready = {fd for fd, _ in self._epoll.poll(0) if fd in self.waiters}
        inodes = {self.waiters[fd].inode for fd in ready}
        group = [fd for fd, w in self.waiters.items() if w.inode in inodes]
        dry: set[int] = set()  # listeners found with nothing queued
        for fd in sorted(group, key=lambda fd: self.waiters[fd].since):
            waiter = self.waiters.get(fd)
            if waiter is None:
                continue
            if waiter.inode in dry:
                if fd in ready:
                    self._epoll.modify(fd, waiter.events)
                continue
            self._wake_waiter(fd)
            again = self.waiters.get(fd)
            if again is not None and again.inode == waiter.inode:
                dry.add(waiter.inode)  # it waits again: nothing was queued

    def _wake_waiter(self, fd: int) -> None:
        waiter = self.waiters.pop(fd, None)
        if waiter is None:
            return
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        # The step owns the socket from here: it closes it, or waits again
        # (still counting from when the call first waited).
        self._rewait_since, self._rewait_timeout = waiter.since, waiter.timeout
        try:
            self._run(waiter.n, waiter.then, waiter.n, waiter.sock)
        finally:
            self._rewait_since = None

    def check_waits(self) -> None:
        """Forget waits whose app thread was killed (nobody to answer any more);
        interrupt those whose thread has a signal to take; end those whose
        socket timeout ran out (SO_RCVTIMEO for accept, SO_SNDTIMEO for
        connect), as the kernel's blocking calls do.  A connect carries on in
        the background either way, as the kernel's does."""
        fast = self._fast if self._fast is not None and self._fast.parked else None
        fast_tids = []
        if fast is not None:
            fast.drop_abandoned()
            fast_tids = fast.parked_tids()
        # Which threads take a signal is decided over all of them at once:
        # one sent to the process goes to one thread alone.
        signalled = self._signals.interrupted(
            [*fast_tids, *(w.n.pid for w in [*self.waiters.values(), *self.retries.values()])]
        )
        if fast is not None:
            for tid in fast_tids:
                if tid in signalled and fast.interrupt(tid, ERESTARTSYS):
                    self._counters.interrupted += 1
            fast.expire()
        now = time.monotonic()
        for waiter in list(self.waiters.values()):
            # A TCP connect that runs out of time is still in progress.
            self._end_if_due(waiter, now, waiter.timed_out, signalled)
        for waiter in list(self.retries.values()):
            if not self._end_if_due(waiter, now, errno.EAGAIN, signalled):
                self.retries.pop(waiter.sock.fileno())
                self._rewait_since, self._rewait_timeout = waiter.since, waiter.timeout
                try:
                    self._run(waiter.n, waiter.then, waiter.n, waiter.sock)
                finally:
                    self._rewait_since = None

    def _end_if_due(
        self, waiter: _Waiter, now: float, connect_timed_out: int, signalled: set[int]
    ) -> bool:
        """End *waiter* if its thread is gone, has a signal to take (is in
        *signalled*), or ran out of socket timeout (a connect's answer then:
        *connect_timed_out*; an accept's: EAGAIN).  Whether it ended."""
        connect = waiter.n.nr == NR_CONNECT
        timeout = waiter.timeout
        if not self._notify.id_valid(waiter.n.id):
            self._unwait(waiter)
        elif waiter.n.pid in signalled:
            self._unwait(waiter)
            # The kernel never restarts a call that has a timeout (signal(7)).
            self._reply(waiter.n, error=errno.EINTR if timeout else ERESTARTSYS)
            self._counters.interrupted += 1
        elif 0 < timeout <= now - waiter.since:
            self._unwait(waiter)
            self._reply(waiter.n, error=connect_timed_out if connect else errno.EAGAIN)
        else:
            return False
        return True


def _timeout(sock: _socket.socket, option: int) -> float:
    """*sock*'s SO_RCVTIMEO or SO_SNDTIMEO in seconds; 0 for none."""
    try:
        seconds, micros = _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _TIMEVAL.size))
    except OSError:
        return 0.0
    limit: float = seconds + micros / 1e6
    return limit
