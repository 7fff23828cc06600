"""Signals with their origin: a signalfd, read from trio.

Why not trio's signal receiver: it says which signal came, not who sent it.
The supervisor must tell a terminal's Ctrl-C (the kernel sends it to the whole
foreground group, the app included: forwarding it would deliver it twice)
from a ``kill -INT`` aimed at ``axnet run`` alone (which only forwarding
brings to the app).  ``si_code`` says which: ``SI_KERNEL`` for the terminal,
``SI_USER`` (and friends) for a process.

The signals must be blocked in every thread (else the kernel may deliver one
to a thread instead of queueing it for the signalfd); the supervisor blocks
them before it starts any thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
from collections.abc import Iterable

_libc = ctypes.CDLL(None, use_errno=True)
_signalfd = _libc.signalfd
_signalfd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_signalfd.restype = ctypes.c_int

SFD_NONBLOCK = os.O_NONBLOCK
SFD_CLOEXEC = os.O_CLOEXEC

#: si_code of a signal the kernel raised itself (a terminal's, for one).
SI_KERNEL = 0x80

#: struct signalfd_siginfo: 128 bytes; ssi_signo, ssi_errno, ssi_code, ssi_pid first.
_SIGINFO = struct.Struct("=IiiI112x")


def open_signalfd(signums: Iterable[int]) -> int:
    """A non-blocking signalfd for *signums* (which the caller keeps blocked)."""
    mask = (ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))()
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    for signum in signums:
        mask[(signum - 1) // bits] |= 1 << ((signum - 1) % bits)
    fd: int = _signalfd(-1, ctypes.byref(mask), SFD_NONBLOCK | SFD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def read_signals(fd: int) -> list[tuple[signal.Signals, int]]:
    """Every (signal, si_code) queued on the signalfd now; [] if none."""
    out: list[tuple[signal.Signals, int]] = []
    while True:
        try:
            data = os.read(fd, _SIGINFO.size * 16)
        except BlockingIOError:
            return out
        for offset in range(0, len(data) - _SIGINFO.size + 1, _SIGINFO.size):
            signo, _errno, code, _pid = _SIGINFO.unpack_from(data, offset)
            out.append((signal.Signals(signo), code))
