"""ctypes bindings: seccomp user notification, pidfd, process memory.

Theory of operation
-------------------
Everything here sits on the per-connect hot path of the supervisor, so each
binding is resolved once at import with exact `argtypes`, and each
`NotifyFd` owns preallocated buffers that the ioctls read and write in place
(packed and unpacked with precompiled `struct.Struct`s, which is cheaper
than ctypes field access).  A `NotifyFd` is not thread-safe: one supervisor
thread drives it.

`syscall(2)` is variadic; ctypes passes an unannotated Python int as a C
`int`, which would truncate pointers and 64-bit ids.  Each system call we make
through it therefore gets its own function object (`libc["syscall"]` returns a
fresh one) with a full prototype.

Kernel facts relied upon (Linux 6.x, include/uapi/linux/seccomp.h):

* `SECCOMP_IOCTL_NOTIF_RECV` blocks until a notification is pending and
  returns EINVAL unless the buffer is zeroed; it returns ENOENT when the task
  that raised the notification went away between wake-up and the read.
* The notifying task's `pid` is its thread id in the supervisor's pid
  namespace; for a non-leader thread `pidfd_open(tid, 0)` fails (ENOENT on 6.18)
  and `pidfd_open(tid, PIDFD_THREAD)` (Linux >= 6.9) is the way to a pidfd
  that `pidfd_getfd` accepts (the fd table is shared by the thread group).
* `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV` (Linux >= 5.19): once the
  supervisor has received a notification the task waits killably, so a
  non-fatal signal (Go's SIGURG preemption, a timer) cannot abort and restart
  a connect the supervisor is already carrying out on the task's behalf.  A
  call parked for longer (a blocking accept or connect) is interrupted by the
  engine itself when a signal waits for its thread (`ERESTARTSYS`).
* `SECCOMP_ADDFD` installs one of our fds in the task; the engine then answers
  the call with its number.  Not in one step with `SECCOMP_ADDFD_FLAG_SEND`
  (Linux >= 5.14): that flag marks the notification answered, with 0, as soon
  as it is queued, and a signal or stop (Ctrl-Z) that interrupts our wait
  before the task takes the fd withdraws the fd but not the answer: the
  task's `accept` returns 0 (Linux 6.18 still does).  Without the flag an
  interrupted ADDFD is either withdrawn or done, and safe to repeat; the
  answer after it wakes the task on our CPU (`SYNC_WAKE_UP`).  The kernel's
  `accept` installs the fd before returning too, so the app's other threads
  can see it that early either way.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from typing import Any

import attrs

_libc = ctypes.CDLL(None, use_errno=True)
_get_errno = ctypes.get_errno
_c_int = ctypes.c_int
_c_uint = ctypes.c_uint
_c_long = ctypes.c_long
_c_ulong = ctypes.c_ulong
_c_void_p = ctypes.c_void_p

# --- x86_64 system call numbers ---------------------------------------------
NR_PROCESS_VM_READV = 310
NR_PROCESS_VM_WRITEV = 311
NR_SECCOMP = 317
NR_PIDFD_OPEN = 434
NR_PIDFD_GETFD = 438

# --- prctl / seccomp ----------------------------------------------------------
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1 << 2
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1 << 0
SECCOMP_ADDFD_FLAG_SETFD = 1 << 0
SECCOMP_ADDFD_FLAG_SEND = 1 << 1
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1 << 0

#: The kernel's "interrupted: restart if the handler allows" (include/linux/errno.h).
#: An answer with this error leaves the decision to the kernel's own signal
#: code on the way back to user space: with SA_RESTART (or no handler to run)
#: the call is made again, without it the app sees EINTR.  Only for a thread
#: that has a signal pending, or the value would reach the app as errno 512.
ERESTARTSYS = 512

#: pidfd_open flag (Linux >= 6.9): a pidfd for a thread, not a thread-group leader.
PIDFD_THREAD = os.O_EXCL

# --- ioctl numbers (asm-generic/ioctl.h) ----------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _iow(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, type_, nr, size)


def _iowr(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, size)


# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data data; }
# struct seccomp_data { int nr; u32 arch; u64 instruction_pointer; u64 args[6]; }
_NOTIF = struct.Struct("=QIIiIQ6Q")
# struct seccomp_notif_resp { u64 id; s64 val; s32 error; u32 flags; }
_RESP = struct.Struct("=QqiI")
# struct seccomp_notif_addfd { u64 id; u32 flags; u32 srcfd; u32 newfd; u32 newfd_flags; }
_ADDFD = struct.Struct("=QIIII")
_U64 = struct.Struct("=Q")
# struct seccomp_notif_sizes { u16 seccomp_notif; u16 seccomp_notif_resp; u16 seccomp_data; }
_SIZES = struct.Struct("=HHH")
# struct iovec { void *iov_base; size_t iov_len; }
_IOVEC = struct.Struct("=QQ")

SECCOMP_IOC_MAGIC = ord("!")
SECCOMP_IOCTL_NOTIF_RECV = _iowr(SECCOMP_IOC_MAGIC, 0, _NOTIF.size)
SECCOMP_IOCTL_NOTIF_SEND = _iowr(SECCOMP_IOC_MAGIC, 1, _RESP.size)
SECCOMP_IOCTL_NOTIF_ID_VALID = _iow(SECCOMP_IOC_MAGIC, 2, _U64.size)
SECCOMP_IOCTL_NOTIF_ADDFD = _iow(SECCOMP_IOC_MAGIC, 3, _ADDFD.size)
SECCOMP_IOCTL_NOTIF_SET_FLAGS = _iow(SECCOMP_IOC_MAGIC, 4, _U64.size)

# --- bindings -------------------------------------------------------------------
_ioctl_fn = _libc.ioctl
_ioctl_fn.argtypes = [_c_int, _c_ulong, _c_void_p]
_ioctl_fn.restype = _c_int
_ioctl: Callable[[int, int, int], int] = _ioctl_fn

_prctl_fn = _libc.prctl
_prctl_fn.argtypes = [_c_int, _c_ulong, _c_ulong, _c_ulong, _c_ulong]
_prctl_fn.restype = _c_int
_prctl: Callable[[int, int, int, int, int], int] = _prctl_fn


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send *signum* to this process when its parent thread dies."""
    if _prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) < 0:
        raise _oserror()


CLONE_FS = 0x200

_unshare_fn = _libc.unshare
_unshare_fn.argtypes = [_c_int]
_unshare_fn.restype = _c_int
_unshare: Callable[[int], int] = _unshare_fn


def unshare_fs() -> None:
    """Give the calling thread its own working directory and umask."""
    if _unshare(CLONE_FS) < 0:
        raise _oserror()


def _syscall(*argtypes: type[ctypes._SimpleCData[Any]]) -> Any:
    fn = _libc["syscall"]
    fn.argtypes = [_c_long, *argtypes]
    fn.restype = _c_long
    return fn


_sys_seccomp: Callable[[int, int, int, int], int] = _syscall(_c_uint, _c_uint, _c_void_p)
_sys_pidfd_open: Callable[[int, int, int], int] = _syscall(_c_int, _c_uint)
_sys_pidfd_getfd: Callable[[int, int, int, int], int] = _syscall(_c_int, _c_int, _c_uint)
# process_vm_readv(pid, local_iov, liovcnt, remote_iov, riovcnt, flags)
_sys_process_vm: Callable[[int, int, bytes, int, bytes, int, int], int] = _syscall(
    _c_int, _c_void_p, _c_ulong, _c_void_p, _c_ulong, _c_ulong
)


def _oserror(err: int | None = None) -> OSError:
    e = _get_errno() if err is None else err
    return OSError(e, os.strerror(e))


@attrs.frozen
class Notification:
    """One `struct seccomp_notif`: task `pid` (a thread id) raised syscall `nr`."""

    id: int
    pid: int
    flags: int
    nr: int
    arch: int
    ip: int
    args: tuple[int, int, int, int, int, int]


def notif_sizes() -> tuple[int, int, int]:
    """(sizeof seccomp_notif, seccomp_notif_resp, seccomp_data) as the kernel has them."""
    buf = ctypes.create_string_buffer(_SIZES.size)
    if _sys_seccomp(NR_SECCOMP, SECCOMP_GET_NOTIF_SIZES, 0, ctypes.addressof(buf)) < 0:
        raise _oserror()
    notif, resp, data = _SIZES.unpack(buf.raw)
    return notif, resp, data


_checked_sizes: tuple[int, int] | None = None


def buffer_sizes() -> tuple[int, int]:
    """Buffer sizes for RECV and SEND, refusing a kernel whose layout is smaller than ours."""
    global _checked_sizes  # computed once per process  # noqa: PLW0603
    if _checked_sizes is None:
        notif, resp, _data = notif_sizes()
        if notif < _NOTIF.size or resp < _RESP.size:
            raise OSError(
                0,
                f"kernel seccomp_notif/resp sizes {notif}/{resp} are smaller than "
                f"{_NOTIF.size}/{_RESP.size}",
            )
        _checked_sizes = (notif, resp)
    return _checked_sizes


class _Buffer:
    """A zero-initialised byte buffer with a stable address for ioctl arguments."""

    __slots__ = ("address", "data", "zero")

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.zero = bytes(size)
        self.address = ctypes.addressof((ctypes.c_char * size).from_buffer(self.data))


class NotifyFd:
    """The seccomp listener fd of one filter (owned: `close()` closes it)."""

    __slots__ = ("_addfd", "_fd", "_id", "_notif", "_resp")

    def __init__(self, fd: int) -> None:
        notif_size, resp_size = buffer_sizes()
        self._fd = fd
        # The kernel copies its own (possibly larger) struct size into the buffer,
        # and SEND rejects nonzero tails it does not know about: size both by the kernel.
        self._notif = _Buffer(notif_size)
        self._resp = _Buffer(resp_size)
        self._addfd = _Buffer(_ADDFD.size)
        self._id = _Buffer(_U64.size)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O operation on closed NotifyFd")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def recv(self) -> Notification:
        """Receive one pending notification (blocks if none is pending).

        Raises OSError(ENOENT) when the task died before it could be read.
        """
        buf = self._notif
        buf.data[:] = buf.zero
        while _ioctl(self._fd, SECCOMP_IOCTL_NOTIF_RECV, buf.address) < 0:
            err = _get_errno()
            if err != errno.EINTR:
                raise _oserror(err)
            buf.data[:] = buf.zero
        nid, pid, flags, nr, arch, ip, a0, a1, a2, a3, a4, a5 = _NOTIF.unpack_from(buf.data)
        return Notification(nid, pid, flags, nr, arch, ip, (a0, a1, a2, a3, a4, a5))

    def respond(self, id: int, val: int = 0, error: int = 0) -> None:
        """Answer: the syscall returns `val`, or fails with the positive errno `error`."""
        _RESP.pack_into(self._resp.data, 0, id, val, -error, 0)
        if _ioctl(self._fd, SECCOMP_IOCTL_NOTIF_SEND, self._resp.address) < 0:
            raise _oserror()

    def respond_continue(self, id: int) -> None:
        """Let the kernel run the syscall as the task issued it.

        Only safe when the decision did not depend on the task's memory (TOCTOU).
        """
        _RESP.pack_into(self._resp.data, 0, id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        if _ioctl(self._fd, SECCOMP_IOCTL_NOTIF_SEND, self._resp.address) < 0:
            raise _oserror()

    def id_valid(self, id: int) -> bool:
        """Is notification `id` still pending (the task alive and still waiting)?"""
        _U64.pack_into(self._id.data, 0, id)
        if _ioctl(self._fd, SECCOMP_IOCTL_NOTIF_ID_VALID, self._id.address) < 0:
            err = _get_errno()
            if err == errno.ENOENT:
                return False
            raise _oserror(err)
        return True

    def addfd(self, id: int, srcfd: int, *, cloexec: bool, send: bool = False) -> int:
        """Install our `srcfd` in the task; returns its fd number there.

        With `send`, the notification is answered with that number at once,
        which a signal to us can turn into an answer of 0 (see the module
        docstring): only the probe uses it.  Without, an interrupted call is
        repeated (it was withdrawn, or it is done and says so).
        """
        _ADDFD.pack_into(
            self._addfd.data,
            0,
            id,
            SECCOMP_ADDFD_FLAG_SEND if send else 0,
            srcfd,
            0,
            os.O_CLOEXEC if cloexec else 0,
        )
        while True:
            newfd = _ioctl(self._fd, SECCOMP_IOCTL_NOTIF_ADDFD, self._addfd.address)
            if newfd >= 0:
                return newfd
            err = _get_errno()
            if err != errno.EINTR or send:
                raise _oserror(err)

    def set_sync_wakeup(self) -> None:
        """Ask for synchronous wake-ups (Linux >= 6.6): the task and the supervisor
        hand the CPU to each other instead of going through the scheduler's queue."""
        # The flags travel in the ioctl argument itself, not behind a pointer.
        if _ioctl(self._fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP) < 0:
            raise _oserror()

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> NotifyFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NotifyFd({self._fd})"


def pidfd_open(pid: int, flags: int = 0) -> int:
    """A pidfd for `pid` (a thread id needs `PIDFD_THREAD` unless it leads its group)."""
    fd = _sys_pidfd_open(NR_PIDFD_OPEN, pid, flags)
    if fd < 0:
        raise _oserror()
    return int(fd)


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """Our duplicate (O_CLOEXEC) of the target's fd `targetfd`."""
    fd = _sys_pidfd_getfd(NR_PIDFD_GETFD, pidfd, targetfd, 0)
    if fd < 0:
        raise _oserror()
    return int(fd)


def read_memory(pid: int, addr: int, size: int) -> bytes:
    """`size` bytes at `addr` in task `pid`; OSError(EFAULT) unless all are readable."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if size == 0:
        return b""
    buf = ctypes.create_string_buffer(size)
    _transfer(NR_PROCESS_VM_READV, pid, ctypes.addressof(buf), addr, size)
    return buf.raw


def write_memory(pid: int, addr: int, data: bytes) -> None:
    """Write all of `data` at `addr` in task `pid`; OSError(EFAULT) on a partial write."""
    size = len(data)
    if size == 0:
        return
    buf = ctypes.create_string_buffer(data, size)
    _transfer(NR_PROCESS_VM_WRITEV, pid, ctypes.addressof(buf), addr, size)


def _transfer(nr: int, pid: int, local: int, remote: int, size: int) -> None:
    # The iovecs are immutable bytes: the kernel only reads them, and a bytes
    # argument to a c_void_p parameter passes a pointer to its contents.
    n = _sys_process_vm(nr, pid, _IOVEC.pack(local, size), 1, _IOVEC.pack(remote, size), 1, 0)
    if n < 0:
        raise _oserror()
    if n != size:
        raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))  # only part is mapped


def install_filter(program: bytes, *, wait_killable_recv: bool = True) -> int:
    """Set no_new_privs and install `program` (packed sock_filter[]); returns the listener fd.

    Irreversible for the calling process: call it only in the forked child.

    SPEC_ALLOW: a kernel booted with `spec_store_bypass_disable=seccomp` or
    `spectre_v2_user=seccomp` (the default before Linux 5.16) takes any task
    under a filter for a sandbox and turns its speculation mitigations on,
    which can slow an app's every context switch and memory access.  This
    filter is no sandbox: the app keeps the speculation state it would have
    natively.
    """
    if not program or len(program) % 8:
        raise ValueError(f"program length {len(program)} is not a positive multiple of 8")
    if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0:
        raise _oserror()
    insns = ctypes.create_string_buffer(program, len(program))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("=H6xQ", len(program) // 8, ctypes.addressof(insns))
    fprog_buf = ctypes.create_string_buffer(fprog, len(fprog))
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_SPEC_ALLOW
    if wait_killable_recv:
        flags |= SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    fd = _sys_seccomp(NR_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, ctypes.addressof(fprog_buf))
    if fd < 0:
        raise _oserror()
    return int(fd)
