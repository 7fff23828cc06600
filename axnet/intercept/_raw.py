"""Socket calls on raw sockaddr bytes (ctypes).

The engine performs an app's ``connect``/``bind`` from its *private copy* of
the app's sockaddr, byte for byte, so that what the kernel acts on is exactly
what was decided on.  Python's socket methods want parsed address tuples and
cannot express every family; these wrappers take the bytes as they are.
Each returns 0 or a positive errno instead of raising: the errno is the answer
the app gets.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

_connect = _libc.connect
_connect.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
_connect.restype = ctypes.c_int

_bind = _libc.bind
_bind.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
_bind.restype = ctypes.c_int

_accept4 = _libc.accept4
_accept4.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
_accept4.restype = ctypes.c_int

_SOCKADDR_MAX = 128


def connect(fd: int, sockaddr: bytes) -> int:
    """``connect(fd, sockaddr)``; 0 or the errno."""
    if _connect(fd, sockaddr, len(sockaddr)) == 0:
        return 0
    return ctypes.get_errno()


def bind(fd: int, sockaddr: bytes) -> int:
    """``bind(fd, sockaddr)``; 0 or the errno."""
    if _bind(fd, sockaddr, len(sockaddr)) == 0:
        return 0
    return ctypes.get_errno()


def accept4(fd: int, flags: int) -> tuple[int, bytes]:
    """``accept4``; returns (new fd, peer sockaddr bytes) or raises OSError."""
    buffer = ctypes.create_string_buffer(_SOCKADDR_MAX)
    length = ctypes.c_uint32(_SOCKADDR_MAX)
    new_fd = _accept4(fd, ctypes.addressof(buffer), ctypes.addressof(length), flags)
    if new_fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return new_fd, buffer.raw[: min(length.value, _SOCKADDR_MAX)]


_getsockname = _libc.getsockname
_getsockname.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_getsockname.restype = ctypes.c_int
_getpeername = _libc.getpeername
_getpeername.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_getpeername.restype = ctypes.c_int
_name_buffer = ctypes.create_string_buffer(_SOCKADDR_MAX)
_name_length = ctypes.c_uint32(0)


def _name(call: object, fd: int) -> bytes:
    # One buffer for all calls: the engine calls these from its one thread.
    _name_length.value = _SOCKADDR_MAX
    if call(fd, ctypes.addressof(_name_buffer), ctypes.addressof(_name_length)) < 0:  # type: ignore[operator]  # a ctypes function
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return _name_buffer.raw[: min(_name_length.value, _SOCKADDR_MAX)]


def getsockname(fd: int) -> bytes:
    """``getsockname`` as raw sockaddr bytes; raises OSError."""
    return _name(_getsockname, fd)


def getpeername(fd: int) -> bytes:
    """``getpeername`` as raw sockaddr bytes; raises OSError."""
    return _name(_getpeername, fd)
