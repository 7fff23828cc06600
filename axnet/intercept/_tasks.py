"""Reaching into the app's threads: their sockets and their memory, safely.

Theory of operation
-------------------
A notification names a thread id.  Thread ids are reused, so every handle the
engine keeps names one *task* for that task's whole life, never a number:

* a pidfd (``pidfd_open(tid, PIDFD_THREAD)``) names one thread; once the thread
  is gone, ``pidfd_getfd`` through it fails with ESRCH, it never reaches a new
  thread that got the same id.  So pidfds are cached per tid, and a stale one
  is replaced when it says ESRCH;
* an open ``/proc/TID/mem`` names one address space, the process's, not the
  thread's: it outlives the thread it was opened through for as long as the
  process lives.  So a mem handle is only used beside a live pidfd of the same
  task: opening a fresh pidfd for a tid drops its mem handle, and a cached mem
  handle is used only once its pidfd is checked alive.  A freshly opened one
  is trusted only after the notification is checked still valid (the thread
  is parked in its syscall, so the tid was not reused between the open and
  the check).
* ``/proc/TID/mem`` reaches pages the app itself may not (the kernel lets a
  debugger write breakpoints into code), so every access is first checked
  against the app's mappings: ``PROCMAP_QUERY`` (Linux 6.11) on a
  ``/proc/TID/maps`` handle opened beside the mem handle, which names the
  same address space.  A range the app could not read (or write) is EFAULT,
  as the kernel answers the app.  Older kernels have no such query: there
  the protections are not honoured (only unmapped memory is EFAULT).

A thread parked in a blocking call waits killably (see ``_libc``): only a
fatal signal ends the wait.  :class:`SignalTargets` tells the engine which
parked threads have a signal to take, as the kernel would give it.

Kernels before 6.9 have no thread pidfds; there nothing is kept between
calls (see :class:`Tasks`).  The caches are bounded; dropping them only
costs a re-open.  The native hot path (``_fastpath``) reads the same caches
(:attr:`Tasks.pidfds`, :attr:`Tasks.mems`, :attr:`Tasks.maps`) but never
fills them: a handle is only ever opened and validated here (for a thread's
first call it asks :meth:`Tasks.adopt`).  It reads memory only after
``pidfd_getfd`` through the cached pidfd succeeded, which is its liveness
check.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import resource
import signal
import struct
from collections.abc import Callable, Iterable, Sequence

import attrs

from ._libc import PIDFD_THREAD, pidfd_getfd, pidfd_open

log = logging.getLogger("axnet.run")

#: Handles kept per cache (one fd each).
MAX_CACHED = 256

#: Fewest threads whose handles are cached, however low the fd limit.
MIN_CACHED = 8

#: Errors of a full fd table (the process's or the system's).
NO_FD = frozenset({errno.EMFILE, errno.ENFILE})


def cache_size() -> int:
    """How many threads' handles (three fds each) to keep: an eighth of the
    open-file limit, which the supervisor shares with what it holds for the
    app (duplicates of its sockets, a parked call's listener)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CACHED
    return max(MIN_CACHED, min(MAX_CACHED, soft // 8))


#: ioctl on /proc/PID/maps (linux/fs.h, 6.11): _IOWR('f', 17, struct procmap_query).
PROCMAP_QUERY = 0xC0686611
#: struct procmap_query: size, query_flags, query_addr, then what the kernel
#: fills in (vma_start, vma_end, vma_flags first); 104 bytes.
_PROCMAP = struct.Struct("=QQQQQQ56x")
#: vma_flags bits.
VMA_READABLE = 0x1
VMA_WRITABLE = 0x2


class Errno(Exception):
    """Answer the notification with this errno."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


class Gone(Exception):
    """The notification is no longer valid: the thread died or stopped waiting."""


@functools.cache
def thread_pidfds() -> bool:
    """Whether this kernel gives pidfds of threads (PIDFD_THREAD, Linux 6.9)."""
    try:
        os.close(pidfd_open(os.getpid(), PIDFD_THREAD))
    except OSError:
        return False
    return True


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


def _fields(status: bytes) -> dict[bytes, bytes]:
    fields: dict[bytes, bytes] = {}
    for line in status.splitlines():
        key, _, value = line.partition(b":")
        fields[key] = value.strip()
    return fields


@attrs.frozen
class _Signals:
    """What a ``/proc/TID/status`` text says of a thread's signals."""

    tgid: int
    own: int  # sent to the thread and not blocked
    shared: int  # sent to the process and not blocked by this thread
    process_pending: int  # sent to the process, blocked or not (the same in every thread)
    blocked: int
    exiting: bool

    @classmethod
    def parse(cls, status: bytes) -> _Signals | None:
        fields = _fields(status)
        try:
            blocked = int(fields[b"SigBlk"], 16)
            return cls(
                tgid=int(fields[b"Tgid"]),
                own=int(fields[b"SigPnd"], 16) & ~blocked,
                shared=int(fields[b"ShdPnd"], 16) & ~blocked,
                process_pending=int(fields[b"ShdPnd"], 16),
                blocked=blocked,
                exiting=fields.get(b"State", b"")[:1] in (b"Z", b"X"),
            )
        except (KeyError, ValueError):
            return None


def _wants(signals: _Signals) -> bool:
    """Whether the kernel would give a process-wide signal to this thread
    (``wants_signal()``): it does not block it, has none of its own to take
    yet (a thread with a signal pending is passed over), and is not exiting."""
    return bool(signals.shared) and not signals.own and not signals.exiting


def kernel_pick(threads: Sequence[tuple[int, _Signals]], after: int | None) -> int | None:
    """The thread the kernel gives a process-wide signal to (``complete_signal()``).

    *threads* are the process's, in the kernel's order (``/proc/PID/task``'s:
    the leader first, then by creation).  The leader takes it if it wants
    it; otherwise the first thread that does, counting from the one the
    last such signal went to (*after*, where known; else the leader).
    None when no thread wants it.
    """
    if not threads:
        return None
    if _wants(threads[0][1]):
        return threads[0][0]
    tids = [tid for tid, _ in threads]
    start = tids.index(after) if after in tids else 0
    for tid, signals in [*threads[start:], *threads[:start]]:
        if _wants(signals):
            return tid
    return None


def _read_signals(tid: int) -> _Signals | None:
    try:
        with open(f"/proc/{tid}/status", "rb") as status:
            return _Signals.parse(status.read())
    except OSError:
        return None  # gone: the validity check drops its wait


def _threads(tgid: int) -> list[tuple[int, _Signals]]:
    try:
        tids = [int(name) for name in os.listdir(f"/proc/{tgid}/task")]
    except (OSError, ValueError):
        return []
    tids.sort(key=lambda tid: tid != tgid)  # the leader first (it is listed first)
    return [(tid, signals) for tid in tids if (signals := _read_signals(tid)) is not None]


class SignalTargets:
    """Which of an app's parked threads a pending signal interrupts.

    A parked thread waits killably (see ``_libc``), so the kernel wakes none
    of them for an ordinary signal; the engine answers a thread's call
    ``ERESTARTSYS`` so that it takes the signal.  The kernel acts on that
    answer only in the thread it gave the signal to: in any other the value
    reaches the app as errno 512.  A signal sent to one thread (``SigPnd``)
    is that thread's.  One sent to the whole process (``ShdPnd``) went to
    one thread (:func:`kernel_pick`), which is interrupted alone.  The
    guess starts from the kernel's last pick, which is not visible: it is
    the last one the guess made.  Where the guess is wrong, the signal is
    still pending at the next check, which tries the next thread that
    wants it: a signal the kernel gave a parked thread is taken within a
    check per thread of the app.  (Only the leader's is certain: it takes
    every signal it does not block.)
    """

    def __init__(
        self,
        read: Callable[[int], _Signals | None] = _read_signals,
        threads: Callable[[int], list[tuple[int, _Signals]]] = _threads,
    ) -> None:
        """*read* gives a thread's signals, *threads* a process's threads
        with theirs (from ``/proc``, but for tests)."""
        self._read = read
        self._threads = threads
        #: tgid -> the thread the last process-wide signal was given to, as far as seen.
        self._last: dict[int, int] = {}
        #: tgid -> (pending bits, threads tried) while its process-wide signal waits.
        self._trying: dict[int, tuple[int, set[int]]] = {}

    def interrupted(self, tids: Iterable[int]) -> set[int]:
        """Of the parked threads *tids*, those whose call a signal should end now."""
        chosen: set[int] = set()
        process_wide: dict[int, set[int]] = {}  # tgid -> parked threads it may go to
        for tid in tids:
            signals = self._read(tid)
            if signals is None:
                continue
            if signals.own or (signals.shared and signals.tgid == tid):
                chosen.add(tid)
            elif signals.shared:
                process_wide.setdefault(signals.tgid, set()).add(tid)
        for tgid in set(self._trying) - set(process_wide):
            del self._trying[tgid]  # taken
        for tgid, parked in process_wide.items():
            threads = self._threads(tgid)
            if not threads:
                continue
            pending = threads[0][1].process_pending
            bits, tried = self._trying.get(tgid, (pending, set()))
            if bits != pending:
                tried = set()
            # A thread tried at an earlier check while this signal waited,
            # parked or not, did not take it: the kernel gave it to another.
            left = [(tid, signals) for tid, signals in threads if tid not in tried]
            pick = kernel_pick(left, self._last.get(tgid))
            if pick is None:
                self._trying.pop(tgid, None)  # every one tried: from the start next time
                continue
            if pick == tgid:
                continue  # the leader's, certainly: it takes it itself
            # The kernel remembers where its search ended; so does the guess.
            if len(self._last) >= MAX_CACHED:
                self._last.clear()
            self._last[tgid] = pick
            self._trying[tgid] = (pending, tried | {pick})
            if pick in parked:
                chosen.add(pick)  # else a thread that is not parked takes it itself
        return chosen


def gone_or_errno(exc: OSError) -> Exception:
    """Gone when the thread is, else the reason to answer with.

    Anything else (EMFILE, ENFILE in the supervisor, EACCES for a
    non-dumpable app) would leave the thread waiting for an answer forever.
    """
    if exc.errno in (errno.ESRCH, errno.ENOENT):
        return Gone()
    return Errno(exc.errno or errno.EIO)


class _Cache:
    def __init__(
        self, opener: Callable[[int], int], *, size: int, relieve: Callable[[], None]
    ) -> None:
        """*relieve* makes room when no fd is free (see Tasks.relieve)."""
        self._opener = opener
        self._size = size
        self._relieve = relieve
        #: tid -> fd; the same dict object for life (the native path holds it).
        self.fds: dict[int, int] = {}

    def get(self, tid: int) -> tuple[int, bool]:
        """(fd, fresh): a cached handle, or a newly opened one."""
        fd = self.fds.get(tid)
        if fd is not None:
            return fd, False
        try:
            fd = self._opener(tid)
        except OSError as exc:
            if exc.errno not in NO_FD:
                raise
            self._relieve()
            fd = self._opener(tid)
        if len(self.fds) >= self._size:
            self.clear()
        self.fds[tid] = fd
        return fd, True

    def drop(self, tid: int) -> None:
        fd = self.fds.pop(tid, None)
        if fd is not None:
            os.close(fd)

    def clear(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


#: /proc/TID/mem takes offsets as a signed 64-bit off_t; no user address is
#: that high anyway.
_ADDRESS_LIMIT = 1 << 63


def _check_range(address: int, size: int) -> None:
    """EFAULT, as the kernel answers, for an address no app memory can be at."""
    if not 0 <= address <= _ADDRESS_LIMIT - size:
        raise Errno(errno.EFAULT)


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # it exists (EPERM: it changed credentials)
    return True


def _open_mem(tid: int) -> int:
    return os.open(f"/proc/{tid}/mem", os.O_RDWR | os.O_CLOEXEC)


def _open_maps(tid: int) -> int:
    return os.open(f"/proc/{tid}/maps", os.O_RDONLY | os.O_CLOEXEC)


@functools.cache
def _procmap_missing() -> None:
    log.info(
        "no PROCMAP_QUERY (Linux 6.11) here: results written into the app's memory "
        "cannot honour its page protections"
    )


def permitted(maps: int, address: int, size: int, need: int) -> bool:
    """Whether the app may access [address, address + size) with the rights
    *need* (VMA_READABLE, VMA_WRITABLE): every byte mapped, every mapping
    allowing it.  True where the kernel cannot tell (before 6.11)."""
    end = address + size
    while address < end:
        query = bytearray(_PROCMAP.pack(_PROCMAP.size, 0, address, 0, 0, 0))
        try:
            fcntl.ioctl(maps, PROCMAP_QUERY, query)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False  # nothing mapped there
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                _procmap_missing()
                return True
            raise
        _size, _flags, _addr, _start, vma_end, flags = _PROCMAP.unpack(query)
        if flags & need != need:
            return False
        address = vma_end
    return True


class Tasks:
    """The app's threads, as far as the engine needs to reach them."""

    def __init__(self, is_valid: Callable[[int], bool], *, keep: bool | None = None) -> None:
        self._is_valid = is_valid
        size = cache_size()
        self._pidfds = _Cache(_open_pidfd, size=size, relieve=self.relieve)
        self._mems = _Cache(_open_mem, size=size, relieve=self.relieve)
        #: /proc/TID/maps beside each mem handle: opened, dropped and
        #: validated with it (both name the address space at their open).
        self._maps = _Cache(_open_maps, size=size, relieve=self.relieve)
        self._said_full = False
        #: Whether handles are kept between calls.  Not without thread pidfds:
        #: the leader's pidfd outlives a thread whose id a task of another
        #: process may get, so nothing could tell a kept handle is stale.  Each
        #: call then opens its own, trusted once the notification is checked
        #: (and the native path, finding none, hands every call to Python).
        self._keep = thread_pidfds() if keep is None else keep
        self._said_denied = False

    def _pidfd(self, tid: int) -> tuple[int, bool]:
        """(pidfd, fresh) for *tid*; a fresh one drops the tid's mem handle,
        which may be an earlier task's; raises Errno or Gone."""
        try:
            pidfd, fresh = self._pidfds.get(tid)
        except OSError as exc:
            raise gone_or_errno(exc) from None
        if fresh:
            self._drop_mem(tid)
        return pidfd, fresh

    def _drop_mem(self, tid: int) -> None:
        self._mems.drop(tid)
        self._maps.drop(tid)

    def _forget(self, tid: int) -> None:
        """The thread is gone and its id may be another task's now."""
        self._pidfds.drop(tid)
        self._drop_mem(tid)

    def relieve(self) -> None:
        """The supervisor has no fd free: close every cached handle (they
        are reopened as needed), so that the app's call need not fail for
        what the supervisor holds.  Said once."""
        if not self._said_full:
            self._said_full = True
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.warning(
                "supervisor at its open-file limit (%d, shared with what it holds for the "
                "app): dropping cached thread handles; raise 'ulimit -n' if calls fail "
                "with EMFILE",
                soft,
            )
        for cache in (self._pidfds, self._mems, self._maps):
            cache.clear()

    def _say_if_denied(self, exc: OSError, tid: int) -> None:
        """Once: why every call of the app fails, where the kernel denies us
        because the app is not dumpable (its /proc files are then root's; a
        task on its way out is denied too, and is not)."""
        if exc.errno in (errno.EPERM, errno.EACCES) and not self._said_denied:
            try:
                if os.stat(f"/proc/{tid}/mem").st_uid == os.getuid():
                    return
            except OSError:
                return  # gone
            self._said_denied = True
            # The app's calls fail with EPERM, from pidfd_getfd, which each
            # makes first (opening its memory says EACCES).
            log.warning(
                "the kernel denies this supervisor the app's sockets and memory: the app "
                "is not dumpable (it called prctl(PR_SET_DUMPABLE, 0), as ssh-agent does, "
                "or runs a program you may not read); its socket calls that axnet handles "
                "fail with EPERM"
            )

    def getfd(self, tid: int, target: int) -> int:
        """Our duplicate of the thread's fd *target*; raises Errno or Gone."""
        try:
            return self._getfd(tid, target)
        finally:
            if not self._keep:
                self._forget(tid)

    def _getfd(self, tid: int, target: int) -> int:
        for attempt in (0, 1):
            pidfd, _ = self._pidfd(tid)
            try:
                return pidfd_getfd(pidfd, target)
            except OSError as exc:
                if exc.errno in NO_FD and not attempt:
                    self.relieve()  # our table is full, not the app's
                    continue
                if exc.errno != errno.ESRCH:
                    self._say_if_denied(exc, tid)
                    raise Errno(exc.errno or errno.EBADF) from None
                self._forget(tid)
                if attempt:
                    raise Gone from None
        raise Gone

    def mem(self, tid: int, notification_id: int) -> tuple[int, int, bool]:
        """(mem, maps, fresh): the thread's address space and its mappings;
        raises Gone or Errno."""
        pidfd, fresh = self._pidfd(tid)
        if not fresh and not _alive(pidfd):
            self._forget(tid)
            self._pidfd(tid)  # whoever has the id now (validated below)
        try:
            fd, fresh = self._mems.get(tid)
            maps, fresh_maps = self._maps.get(tid)
            if self._mems.fds.get(tid) != fd:  # relieved (and closed) while maps opened
                fd, fresh = self._mems.get(tid)
        except OSError as exc:
            self._drop_mem(tid)
            self._say_if_denied(exc, tid)
            raise gone_or_errno(exc) from None
        if self._maps.fds.get(tid) != maps:  # relieved again: no fd to be had
            raise Errno(errno.EMFILE)
        fresh = fresh or fresh_maps
        if fresh and not self._is_valid(notification_id):
            self._drop_mem(tid)
            raise Gone
        return fd, maps, fresh

    @property
    def keeps(self) -> bool:
        """Whether handles are kept between calls (thread pidfds: Linux 6.9)."""
        return self._keep

    def adopt(self, tid: int, notification_id: int) -> bool:
        """Open and validate every handle of *tid* for the native path, which
        only uses handles already here: whether they are (never where nothing
        is kept between calls, nor for a thread already gone)."""
        if not self._keep:
            return False
        try:
            self.mem(tid, notification_id)
        except (Errno, Gone):
            return False
        return True

    def write(self, tid: int, notification_id: int, writes: list[tuple[int, bytes]]) -> None:
        """Store ``(address, bytes)`` pairs in the thread's memory; raises Errno(EFAULT) or Gone."""
        try:
            self._write(tid, notification_id, writes)
        finally:
            if not self._keep:
                self._forget(tid)

    def _write(self, tid: int, notification_id: int, writes: list[tuple[int, bytes]]) -> None:
        for address, data in writes:
            _check_range(address, len(data))
        for attempt in (0, 1):
            fd, maps, fresh = self.mem(tid, notification_id)
            try:
                for address, data in writes:
                    if not permitted(maps, address, len(data), VMA_WRITABLE):
                        raise Errno(errno.EFAULT)  # read-only, or not mapped
                    if os.pwrite(fd, data, address) != len(data):
                        raise OSError(errno.EFAULT, "short write")
                return
            except OSError:
                self._drop_mem(tid)
                if fresh or attempt:
                    raise Errno(errno.EFAULT) from None
        raise Errno(errno.EFAULT)

    def read(self, tid: int, notification_id: int, address: int, size: int) -> bytes:
        """*size* bytes of the thread's memory; raises Errno(EFAULT) or Gone.

        Validity is the caller's to check *after* the read (the bytes only
        count once the notification is known to be live).
        """
        try:
            return self._read(tid, notification_id, address, size)
        finally:
            if not self._keep:
                self._forget(tid)

    def _read(self, tid: int, notification_id: int, address: int, size: int) -> bytes:
        _check_range(address, size)
        for attempt in (0, 1):
            fd, maps, fresh = self.mem(tid, notification_id)
            try:
                if not permitted(maps, address, size, VMA_READABLE):
                    raise Errno(errno.EFAULT)  # not readable, or not mapped
                data = os.pread(fd, size, address)
                if len(data) == size:
                    return data
                raise OSError(errno.EFAULT, "short read")
            except OSError:
                self._drop_mem(tid)
                if fresh or attempt:
                    raise Errno(errno.EFAULT) from None
        raise Errno(errno.EFAULT)

    @property
    def pidfds(self) -> dict[int, int]:
        """The pidfd cache, tid -> fd (read-only outside this class)."""
        return self._pidfds.fds

    @property
    def mems(self) -> dict[int, int]:
        """The ``/proc/TID/mem`` cache, tid -> fd (read-only outside this class)."""
        return self._mems.fds

    @property
    def maps(self) -> dict[int, int]:
        """The ``/proc/TID/maps`` cache beside it, tid -> fd (read-only outside)."""
        return self._maps.fds

    def close(self) -> None:
        self._pidfds.clear()
        self._mems.clear()
        self._maps.clear()
