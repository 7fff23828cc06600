"""Handles on the app's threads name tasks, never reusable ids."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys

import pytest

from axnet.intercept._tasks import (
    VMA_WRITABLE,
    Errno,
    Gone,
    SignalTargets,
    Tasks,
    _Signals,
    _threads,
    kernel_pick,
    permitted,
)


def _child() -> tuple[subprocess.Popen[bytes], int]:
    """A process holding a socket; (process, the socket's fd number there)."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time; s = socket.socket(); print(s.fileno(), flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    return child, int(child.stdout.readline())


def test_a_dead_tasks_cached_handles_fail_instead_of_reaching_another() -> None:
    child, target = _child()
    try:
        tasks = Tasks(lambda ident: True)
        # fd 3 is the child's socket (0-2 are stdio).
        fd = tasks.getfd(child.pid, target)
        with socket.socket(fileno=fd) as sock:
            assert sock.type == socket.SOCK_STREAM
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        # The cached pidfd names the dead task: it cannot reach anything else
        # that the kernel might give the same pid.
        with pytest.raises(Gone):
            tasks.getfd(child.pid, target)
        tasks.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_memory_of_a_fresh_handle_is_trusted_only_when_the_notification_is_live() -> None:
    child, _target = _child()
    try:
        tasks = Tasks(lambda ident: False)  # the notification is gone
        with pytest.raises(Gone):
            tasks.write(child.pid, 1, [(0x1000, b"x")])
        tasks.close()
    finally:
        child.kill()
        child.wait()


def test_bad_addresses_are_efault() -> None:
    child, _target = _child()
    try:
        tasks = Tasks(lambda ident: True)
        with pytest.raises(Errno) as excinfo:
            tasks.read(child.pid, 1, 8, 4)
        assert excinfo.value.errno == 14  # EFAULT
        tasks.close()
    finally:
        child.kill()
        child.wait()


PAGES = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
base = libc.mmap(None, 3 * 4096, 3, 0x22, -1, 0)
ctypes.memset(base, 0x61, 3 * 4096)
libc.mprotect(base + 4096, 4096, 1)
libc.mprotect(base + 8192, 4096, 0)
print(base, flush=True)
time.sleep(60)
"""


def test_memory_the_app_may_not_write_or_read_is_efault() -> None:
    # /proc/PID/mem reaches it all the same; the mappings say no.
    child = subprocess.Popen([sys.executable, "-c", PAGES], stdout=subprocess.PIPE)
    assert child.stdout is not None
    rw = int(child.stdout.readline())
    ro, none = rw + 4096, rw + 8192
    try:
        tasks = Tasks(lambda ident: True)
        tasks.write(child.pid, 1, [(rw, b"b")])
        assert tasks.read(child.pid, 1, rw, 2) == b"ba"
        assert tasks.read(child.pid, 1, ro, 2) == b"aa"
        for write in ([(ro, b"b")], [(rw + 4095, b"bb")], [(none, b"b")]):
            with pytest.raises(Errno) as excinfo:
                tasks.write(child.pid, 1, write)
            assert excinfo.value.errno == errno.EFAULT
        assert tasks.read(child.pid, 1, rw + 4095, 2) == b"aa"  # nothing was written
        for address in (none, ro + 4095):
            with pytest.raises(Errno) as excinfo:
                tasks.read(child.pid, 1, address, 2)
            assert excinfo.value.errno == errno.EFAULT
        tasks.close()
    finally:
        child.kill()
        child.wait()


def test_without_procmap_query_memory_is_taken_as_permitted() -> None:
    # Kernels before 6.11 answer the ioctl ENOTTY (as /dev/null does): the
    # protections cannot be known, and the access goes ahead as before.
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        assert permitted(fd, 0x1000, 16, VMA_WRITABLE)
    finally:
        os.close(fd)


def _status(tgid: int, pending: int, shared: int, blocked: int, state: str = "S") -> bytes:
    return (
        f"Name:\tapp\nState:\t{state} (x)\nTgid:\t{tgid}\nPid:\t{tgid + 1}\n"
        f"SigPnd:\t{pending:016x}\nShdPnd:\t{shared:016x}\nSigBlk:\t{blocked:016x}\n"
        "SigIgn:\t0000000000000000\nSigCgt:\t0000000000004002\n"
    ).encode()


def _bit(signum: int) -> int:
    return 1 << (signum - 1)


def _signals(tgid: int, pending: int, shared: int, blocked: int, state: str = "S") -> _Signals:
    signals = _Signals.parse(_status(tgid, pending, shared, blocked, state))
    assert signals is not None
    return signals


USR1 = _bit(signal.SIGUSR1)


def test_a_process_wide_signal_goes_where_the_kernel_gives_it() -> None:
    blocks, takes = _signals(100, 0, USR1, USR1), _signals(100, 0, USR1, 0)
    # The leader takes it when it does not block it.
    assert kernel_pick([(100, takes), (101, takes)], None) == 100
    # Else the first thread that wants it, from where the last search ended.
    assert kernel_pick([(100, blocks), (101, takes), (102, takes)], None) == 101
    assert kernel_pick([(100, blocks), (101, takes), (102, takes)], 102) == 102
    assert kernel_pick([(100, blocks), (101, takes), (102, blocks)], 102) == 101
    # A thread with a signal of its own pending, or exiting, is passed over.
    own = _signals(100, _bit(signal.SIGALRM), USR1, 0)
    assert kernel_pick([(100, blocks), (101, own), (102, takes)], None) == 102
    exiting = _signals(100, 0, USR1, 0, "Z")
    assert kernel_pick([(100, exiting), (101, takes)], None) == 101
    # Nobody wants it: it waits.
    assert kernel_pick([(100, blocks), (101, blocks)], None) is None
    assert kernel_pick([], None) is None
    assert _Signals.parse(b"garbage\n") is None


class _Process:
    """A fake /proc: thread id -> its signals, the leader first."""

    def __init__(self, **by_tid: _Signals) -> None:
        self.by_tid = {int(tid.removeprefix("t")): s for tid, s in by_tid.items()}

    def targets(self) -> SignalTargets:
        return SignalTargets(read=self.by_tid.get, threads=lambda tgid: list(self.by_tid.items()))


def test_only_the_thread_a_process_wide_signal_went_to_is_interrupted() -> None:
    blocks, takes = _signals(100, 0, USR1, USR1), _signals(100, 0, USR1, 0)
    # The leader blocks it; three parked threads do not: the first takes it.
    proc = _Process(t100=blocks, t101=takes, t102=takes, t103=takes)
    targets = proc.targets()
    assert targets.interrupted([101, 102, 103]) == {101}
    proc.by_tid = {tid: _signals(100, 0, 0, s.blocked) for tid, s in proc.by_tid.items()}
    assert targets.interrupted([101, 102, 103]) == set()  # it was taken
    # The next one goes to the same thread again, as the kernel's search
    # starts where it ended.
    proc.by_tid = {100: blocks, 101: takes, 102: takes, 103: takes}
    assert targets.interrupted([102, 103, 101]) == {101}


def test_a_wrong_guess_moves_on_one_thread_a_check() -> None:
    blocks, takes = _signals(100, 0, USR1, USR1), _signals(100, 0, USR1, 0)
    proc = _Process(t100=blocks, t101=takes, t102=takes, t103=takes)
    targets = proc.targets()
    assert targets.interrupted([101, 102, 103]) == {101}
    # Still pending at the next check: the kernel gave it to another one.
    assert targets.interrupted([101, 102, 103]) == {102}
    assert targets.interrupted([101, 102, 103]) == {103}
    # All tried: it is a new one, and the search starts where the last ended.
    assert targets.interrupted([101, 102, 103]) == set()
    assert targets.interrupted([101, 102, 103]) == {103}


def test_a_thread_that_is_not_parked_takes_its_signal_itself() -> None:
    blocks, takes = _signals(100, 0, USR1, USR1), _signals(100, 0, USR1, 0)
    # 101 runs (not parked) and is first to want it: no parked thread is woken.
    targets = _Process(t100=blocks, t101=takes, t102=takes).targets()
    assert targets.interrupted([102]) == set()
    # ... unless it is still pending a check later: then the parked one had it.
    assert targets.interrupted([102]) == {102}
    # The leader takes any it does not block: nobody else is ever woken for it.
    targets = _Process(t100=takes, t101=takes).targets()
    assert targets.interrupted([101]) == set()
    assert targets.interrupted([101]) == set()


def test_a_signal_of_its_own_or_to_a_parked_leader_interrupts_that_thread() -> None:
    alrm = _bit(signal.SIGALRM)
    proc = _Process(
        t100=_signals(100, 0, USR1, 0),  # the leader, parked: takes USR1
        t101=_signals(100, alrm, USR1, 0),  # its own SIGALRM
        t102=_signals(100, alrm, 0, alrm),  # its own, but blocked
        t103=_signals(100, 0, 0, 0),
    )
    assert proc.targets().interrupted([100, 101, 102, 103, 999]) == {100, 101}


def test_signal_targets_read_a_real_process() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, threading, time; signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1]); "
            "threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); "
            "print(1, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()
        threads = _threads(child.pid)
        assert [tid for tid, _ in threads] == [child.pid, threads[1][0]]
        targets = SignalTargets()
        assert targets.interrupted([tid for tid, _ in threads]) == set()
        child.send_signal(signal.SIGUSR1)  # blocked by both: pending, nobody takes it
        assert targets.interrupted([tid for tid, _ in threads]) == set()
        assert all(s.process_pending == USR1 for _, s in _threads(child.pid))
    finally:
        child.kill()
        child.wait()
    assert targets.interrupted([child.pid]) == set()  # gone
    assert _threads(child.pid) == []


_MARKER_CHILD = (
    "import ctypes, sys, time; b = ctypes.create_string_buffer(sys.argv[1].encode(), 16); "
    "print(ctypes.addressof(b), flush=True); time.sleep(60)"
)


def _marked(marker: str) -> tuple[subprocess.Popen[bytes], int]:
    """A process holding *marker* in its memory; (process, the marker's address)."""
    child = subprocess.Popen([sys.executable, "-c", _MARKER_CHILD, marker], stdout=subprocess.PIPE)
    assert child.stdout is not None
    return child, int(child.stdout.readline())


def test_a_cached_address_space_never_outlives_the_task_it_was_opened_for() -> None:
    # /proc/TID/mem names a process, not a thread: after thread X of P exits,
    # a handle opened through X still reads P.  When the kernel gives X's id
    # to another task Q, Q's calls must not read P.  Stand-ins here: P holds
    # "old", Q holds "new", and Q's id keys P's cached handle, as after X exited.
    old, _ = _marked("old")
    new, address = _marked("new")
    gone, _ = _child()
    gone_pidfd = os.pidfd_open(gone.pid)
    gone.kill()
    gone.wait()
    tasks = Tasks(lambda ident: True)

    def cache_old_for_new() -> None:
        tasks.mems[new.pid] = os.open(f"/proc/{old.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    try:
        # No pidfd cached (that cache was cleared): a fresh pidfd drops it.
        cache_old_for_new()
        assert tasks.read(new.pid, 1, address, 3) == b"new"
        # Beside the pidfd of a task that is gone: the liveness check drops it.
        tasks.close()
        tasks.pidfds[new.pid] = gone_pidfd
        cache_old_for_new()
        assert tasks.read(new.pid, 1, address, 3) == b"new"
        # The native path reads memory only after pidfd_getfd through a cached
        # pidfd worked: a pidfd opened for that drops the stale handle too.
        tasks.close()
        cache_old_for_new()
        os.close(tasks.getfd(new.pid, 0))
        assert new.pid not in tasks.mems
    finally:
        tasks.close()
        for child in (old, new):
            child.kill()
            child.wait()


def test_without_thread_pidfds_nothing_is_kept_between_calls() -> None:
    # Before Linux 6.9 a kept handle could outlive its thread unnoticed: each
    # call opens its own, and the native path, finding none, goes slow.
    child, address = _marked("mine")
    tasks = Tasks(lambda ident: True, keep=False)
    try:
        assert tasks.read(child.pid, 1, address, 4) == b"mine"
        os.close(tasks.getfd(child.pid, 0))
        assert tasks.pidfds == {} and tasks.mems == {}
    finally:
        tasks.close()
        child.kill()
        child.wait()


def test_adopting_a_thread_opens_every_handle_the_native_path_reads() -> None:
    # The native path never opens a handle: for a thread's first call it has
    # Tasks open and validate them, then reads them from the caches.
    child, address = _marked("mine")
    live = {1}
    tasks = Tasks(lambda ident: ident in live, keep=True)
    try:
        assert not tasks.adopt(child.pid, 2)  # its notification is gone: nothing kept
        assert child.pid not in tasks.mems and child.pid not in tasks.maps
        assert tasks.adopt(child.pid, 1)
        assert {child.pid} == tasks.pidfds.keys() == tasks.mems.keys() == tasks.maps.keys()
        assert os.pread(tasks.mems[child.pid], 4, address) == b"mine"
        assert not Tasks(lambda ident: True, keep=False).adopt(child.pid, 1)
    finally:
        tasks.close()
        child.kill()
        child.wait()
    try:
        assert not tasks.adopt(child.pid, 1)  # the thread is gone
    finally:
        tasks.close()
