"""Handles on the app's threads name tasks, never reusable ids."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from axnet.intercept._tasks import Errno, Gone, Tasks, deliverable, signal_waiting


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


def _status(tgid: int, pending: int, shared: int, blocked: int, state: str = "S") -> bytes:
    return (
        f"Name:\tapp\nState:\t{state} (x)\nTgid:\t{tgid}\nPid:\t{tgid + 1}\n"
        f"SigPnd:\t{pending:016x}\nShdPnd:\t{shared:016x}\nSigBlk:\t{blocked:016x}\n"
        "SigIgn:\t0000000000000000\nSigCgt:\t0000000000004002\n"
    ).encode()


def _bit(signum: int) -> int:
    return 1 << (signum - 1)


def test_which_pending_signals_a_parked_thread_takes() -> None:
    alrm, intr = _bit(signal.SIGALRM), _bit(signal.SIGINT)
    # Sent to the thread itself: it takes it, unless it blocks it.
    assert deliverable(_status(100, alrm, 0, 0), 200)
    assert not deliverable(_status(100, alrm, 0, alrm), 200)
    # Sent to the process: the leader takes it; another thread may not be the one.
    assert deliverable(_status(100, 0, intr, 0), 100)
    assert not deliverable(_status(100, 0, intr, 0), 200)
    assert not deliverable(_status(100, 0, intr, intr), 100)
    # ... unless the leader blocks it or is exiting: then any thread that does not.
    leader_blocks = _status(100, 0, intr, intr)
    assert deliverable(_status(100, 0, intr, 0), 200, leader=leader_blocks)
    assert deliverable(_status(100, 0, intr, 0), 200, leader=_status(100, 0, intr, 0, "Z"))
    assert not deliverable(_status(100, 0, intr, 0), 200, leader=_status(100, 0, intr, 0))
    assert not deliverable(_status(100, 0, intr, intr), 200, leader=leader_blocks)
    both = intr | alrm  # the leader takes SIGALRM; SIGINT is left to the others
    assert deliverable(_status(100, 0, both, 0), 200, leader=_status(100, 0, both, intr))
    assert not deliverable(_status(100, 0, intr, 0), 200, leader=b"garbage\n")
    # Nothing pending, or text that is not a status file.
    assert not deliverable(_status(100, 0, 0, 0), 100)
    assert not deliverable(b"garbage\n", 100)


def test_signal_waiting_reads_a_real_thread() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1]); print(1, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()
        assert not signal_waiting(child.pid)
        child.send_signal(signal.SIGUSR1)  # blocked: pending, but it does not take it
        assert not signal_waiting(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not signal_waiting(child.pid)  # gone


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
