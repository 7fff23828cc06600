"""Bindings that need no filter: ioctl numbers, process memory, pidfds."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable

import pytest

from axnet.intercept import _bpf, _libc
from axnet.intercept._libc import (
    PIDFD_THREAD,
    NotifyFd,
    pidfd_getfd,
    pidfd_open,
    read_memory,
    write_memory,
)


def test_ioctl_numbers_match_the_kernel_headers() -> None:
    assert _libc.SECCOMP_IOCTL_NOTIF_RECV == 0xC0502100
    assert _libc.SECCOMP_IOCTL_NOTIF_SEND == 0xC0182101
    assert _libc.SECCOMP_IOCTL_NOTIF_ID_VALID == 0x40082102
    assert _libc.SECCOMP_IOCTL_NOTIF_ADDFD == 0x40182103
    assert _libc.SECCOMP_IOCTL_NOTIF_SET_FLAGS == 0x40082104


def test_kernel_struct_sizes_fit_ours() -> None:
    notif, resp, data = _libc.notif_sizes()
    assert (notif, resp, data) >= (80, 24, 64)


def test_memory_round_trip_in_our_own_process() -> None:
    buf = ctypes.create_string_buffer(b"hello, world", 12)
    assert read_memory(os.getpid(), ctypes.addressof(buf), 12) == b"hello, world"
    write_memory(os.getpid(), ctypes.addressof(buf), b"HELLO")
    assert buf.raw == b"HELLO, world"
    assert read_memory(os.getpid(), ctypes.addressof(buf), 0) == b""


@pytest.mark.parametrize("addr", [0, 8, 0xFFFF_FFFF_FFFF_F000])
def test_bad_pointer_is_efault(addr: int) -> None:
    with pytest.raises(OSError) as info:
        read_memory(os.getpid(), addr, 16)
    assert info.value.errno == errno.EFAULT
    with pytest.raises(OSError) as info:
        write_memory(os.getpid(), addr, b"x" * 16)
    assert info.value.errno == errno.EFAULT


def test_partly_mapped_range_is_efault() -> None:
    # Two pages, the second made inaccessible: process_vm_readv returns a short count.
    page = mmap.PAGESIZE
    area = mmap.mmap(-1, 2 * page)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(area))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(base + page, page, 0) == 0  # PROT_NONE
        assert read_memory(os.getpid(), base + page - 4, 4) == bytes(4)
        with pytest.raises(OSError) as info:
            read_memory(os.getpid(), base + page - 4, 8)
        assert info.value.errno == errno.EFAULT
        assert libc.mprotect(base + page, page, mmap.PROT_READ | mmap.PROT_WRITE) == 0
    finally:
        area.close()


def test_memory_of_a_dead_process_is_esrch() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    with pytest.raises(OSError) as info:
        read_memory(pid, 0x1000, 8)
    assert info.value.errno == errno.ESRCH


def test_pidfd_getfd_duplicates_with_cloexec() -> None:
    pidfd = pidfd_open(os.getpid())
    sock = socket.socket()
    try:
        dup = pidfd_getfd(pidfd, sock.fileno())
        try:
            assert os.path.sameopenfile(dup, sock.fileno())
            assert not os.get_inheritable(dup)
        finally:
            os.close(dup)
        with pytest.raises(OSError) as info:
            pidfd_getfd(pidfd, 1_000_000)
        assert info.value.errno == errno.EBADF
    finally:
        sock.close()
        os.close(pidfd)


def test_non_leader_thread_needs_pidfd_thread() -> None:
    """A notification's pid is a thread id: this is how to reach a non-leader's fds.

    On 6.18, pidfd_open(tid, 0) fails with ENOENT for a non-leader thread;
    PIDFD_THREAD (6.9+) gives a pidfd that pidfd_getfd and process_vm_readv accept
    (the fd table and the memory are the thread group's).
    """
    ready = threading.Event()
    done = threading.Event()

    def park() -> None:
        ready.set()
        done.wait(10)

    thread = threading.Thread(target=park)
    thread.start()
    sock = socket.socket()
    buf = ctypes.create_string_buffer(b"seen by the thread", 18)
    try:
        ready.wait(10)
        tid = thread.native_id
        assert tid is not None
        assert tid != os.getpid()
        with pytest.raises(OSError) as info:
            pidfd_open(tid)
        assert info.value.errno in (errno.ENOENT, errno.EINVAL)
        pidfd = pidfd_open(tid, PIDFD_THREAD)
        try:
            dup = pidfd_getfd(pidfd, sock.fileno())
            assert os.path.sameopenfile(dup, sock.fileno())
            os.close(dup)
        finally:
            os.close(pidfd)
        assert read_memory(tid, ctypes.addressof(buf), 18) == b"seen by the thread"
    finally:
        done.set()
        thread.join(10)
        sock.close()


def test_closed_notify_fd() -> None:
    r, w = os.pipe()
    os.close(w)
    notify = NotifyFd(r)
    notify.close()
    notify.close()
    assert notify.closed
    with pytest.raises(ValueError, match="closed NotifyFd"):
        notify.fileno()


def _speculation_under(install: Callable[[], object]) -> tuple[str, str]:
    """The speculation lines of /proc/self/status in a child, before and after `install()`."""

    def lines() -> str:
        with open("/proc/self/status") as f:
            return "".join(line for line in f if line.startswith("Speculation"))

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - forked child
        try:
            before = lines()
            install()
            os.write(w, json.dumps([before, lines()]).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    before, after = json.loads(data)
    return before, after


def _plain_filter() -> None:
    """An allow-all filter installed without SPEC_ALLOW, as a sandbox would."""
    allow = struct.pack("=HBBI", _bpf.BPF_RET | _bpf.BPF_K, 0, 0, 0x7FFF0000)
    insns = ctypes.create_string_buffer(allow, len(allow))
    fprog = ctypes.create_string_buffer(struct.pack("=H6xQ", 1, ctypes.addressof(insns)), 16)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_libc.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    mode, flags = ctypes.c_long(_libc.SECCOMP_SET_MODE_FILTER), ctypes.c_long(0)
    if libc.syscall(_libc.NR_SECCOMP, mode, flags, ctypes.c_void_p(ctypes.addressof(fprog))):
        raise OSError(ctypes.get_errno(), "seccomp")


def test_the_filter_leaves_the_apps_speculation_state_as_it_was() -> None:
    before, after = _speculation_under(_plain_filter)
    if before == after:
        pytest.skip(
            "this kernel leaves speculation mitigations alone under seccomp "
            "(spec_store_bypass_disable / spectre_v2_user not in seccomp mode): nothing to compare"
        )
    before, after = _speculation_under(lambda: _libc.install_filter(_bpf.build_filter()))
    assert after == before
