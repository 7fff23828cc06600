"""Which addresses are paths, and the app's umask as /proc shows it."""

from __future__ import annotations

import socket
import struct

from axnet.intercept._appfs import app_umask, is_path_address


def _unix(path: bytes) -> bytes:
    return struct.pack("<H", socket.AF_UNIX) + path


def test_path_addresses() -> None:
    assert is_path_address(_unix(b"a-relative-socket-name.sock\0"))
    assert is_path_address(_unix(b"/run/x.sock"))
    assert not is_path_address(_unix(b"\0abstract"))  # no file, no directory
    assert not is_path_address(_unix(b""))  # autobind
    assert not is_path_address(struct.pack("<HH4s8x", socket.AF_INET, 80, bytes(4)))


def test_umask_from_status() -> None:
    assert app_umask(b"Name:\tpython3\nUmask:\t0077\nState:\tS\n") == 0o077
    assert app_umask(b"Name:\tpython3\n") is None
    assert app_umask(b"Umask:\tzz\n") is None
