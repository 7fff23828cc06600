"""Does this kernel give us what the notification engine needs?

The probe does the real thing once, in a forked child: install a filter with a
listener, take the listener with pidfd_getfd, trap one call, and answer it with
SECCOMP_IOCTL_NOTIF_ADDFD + SECCOMP_ADDFD_FLAG_SEND.  Reading kernel versions
or config files would say what should work, not what does (seccomp can be
disabled, a container runtime can filter `seccomp(2)` or `pidfd_getfd(2)`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import select
import signal

from ._bpf import (
    AUDIT_ARCH_X86_64,
    NR_GETPEERNAME,
    SECCOMP_DATA_ARCH,
    SECCOMP_DATA_NR,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_USER_NOTIF,
    Label,
    assemble,
    jeq,
    ld_abs,
    pack,
    ret,
)
from ._libc import NotifyFd, install_filter, pidfd_getfd, pidfd_open

#: How long the probe waits for its child at each step, in seconds.
PROBE_TIMEOUT = 5.0
#: The probe traps getpeername(PROBE_FD, NULL, NULL): an fd no one else uses.
PROBE_FD = 987_654
_EXIT_OK, _EXIT_BAD_RESULT, _EXIT_INSTALL = 0, 2, 3


def _probe_program() -> bytes:
    return pack(
        assemble(
            [
                ld_abs(SECCOMP_DATA_ARCH),
                jeq(AUDIT_ARCH_X86_64, jf="allow"),
                ld_abs(SECCOMP_DATA_NR),
                jeq(NR_GETPEERNAME, jt="notify"),
                Label("allow"),
                ret(SECCOMP_RET_ALLOW),
                Label("notify"),
                ret(SECCOMP_RET_USER_NOTIF),
            ]
        )
    )


@functools.cache
def probe_user_notification() -> str | None:
    """None when user notification, pidfd_getfd and ADDFD SEND work; else why not."""
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            if "user_notif" not in f.read().split():
                return "seccomp action user_notif is not available"
    except OSError:
        pass  # no procfs here: let the real attempt decide
    try:
        return _probe()
    except OSError as e:
        return f"seccomp user notification probe failed: {e}"


def _probe() -> str | None:
    program = _probe_program()
    report_r, report_w = os.pipe()
    ack_r, ack_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - forked child
        code = _EXIT_INSTALL
        try:
            listener = install_filter(program)
            os.write(report_w, b"%d\n" % listener)
            os.read(ack_r, 1)
            libc = ctypes.CDLL(None, use_errno=True)
            newfd = libc.syscall(NR_GETPEERNAME, PROBE_FD, None, None)
            code = _EXIT_BAD_RESULT
            if newfd >= 0 and os.read(newfd, 5) == b"probe":
                code = _EXIT_OK
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(ack_r)
    pidfd = -1
    notify: NotifyFd | None = None
    try:
        if not _readable(report_r):
            return "probe child did not report its listener"
        data = os.read(report_r, 32)
        if not data.endswith(b"\n"):
            return "seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER) failed in the probe child"
        pidfd = pidfd_open(pid)
        notify = NotifyFd(pidfd_getfd(pidfd, int(data)))
        os.write(ack_w, b"1")
        if not _readable(notify.fileno()):
            return "no seccomp notification arrived"
        notif = notify.recv()
        if notif.nr != NR_GETPEERNAME or notif.args[0] != PROBE_FD:
            return f"unexpected notification {notif}"
        payload_r, payload_w = os.pipe()
        try:
            os.write(payload_w, b"probe")
            notify.addfd(notif.id, payload_r, send=True, cloexec=True)
        finally:
            os.close(payload_r)
            os.close(payload_w)
        if not _readable(pidfd):
            return "probe child did not exit"
        _, status = os.waitpid(pid, 0)
        pid = -1
        if os.waitstatus_to_exitcode(status) != _EXIT_OK:
            return f"ADDFD with SECCOMP_ADDFD_FLAG_SEND did not work (status {status})"
        return None
    finally:
        for fd in (report_r, ack_w, pidfd):
            if fd >= 0:
                os.close(fd)
        if notify is not None:
            notify.close()
        if pid > 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(PROBE_TIMEOUT * 1000))
