from __future__ import annotations

import pytest

from swim import AuthenticationError, Keyring

K1 = b"1" * 16
K2 = b"2" * 32


def test_seal_open_and_header() -> None:
    ring = Keyring(K1)
    blob = ring.seal(b"hello")
    assert blob[0] == 0x81
    assert len(blob) == 1 + 12 + 5 + 16
    assert ring.open(blob) == b"hello"


def test_wrong_key_fails_authentication() -> None:
    blob = Keyring(K1).seal(b"hello")
    with pytest.raises(AuthenticationError):
        Keyring(K2).open(blob)


def test_tampered_header_fails() -> None:
    ring = Keyring(K1)
    blob = bytearray(ring.seal(b"hello"))
    blob[5] ^= 1
    with pytest.raises(AuthenticationError):
        ring.open(bytes(blob))


def test_rotation_install_use_remove() -> None:
    ring = Keyring(K1)
    old_blob = ring.seal(b"a")
    ring.install(K2)
    assert ring.primary == K1
    ring.use(K2)
    assert ring.keys == [K2, K1]
    assert ring.open(old_blob) == b"a"
    new_blob = ring.seal(b"b")
    assert Keyring(K2).open(new_blob) == b"b"
    ring.remove(K1)
    with pytest.raises(AuthenticationError):
        ring.open(old_blob)


def test_misuse_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"^keyring keys must be 16, 24 or 32 bytes, got 7$"):
        Keyring(b"x" * 7)
    ring = Keyring(K1)
    with pytest.raises(ValueError, match="cannot remove the primary key"):
        ring.remove(K1)
    with pytest.raises(ValueError, match="not installed"):
        ring.use(K2)
