"""AES-GCM key ring for packets and streams.

Theory of operation: one key is primary and encrypts everything we send; every
installed key is tried when opening, so a cluster rotates keys without
downtime: install the new key everywhere, `use` it everywhere, then remove the
old one everywhere. A sealed blob is

    version (1 byte, SEALED_VERSION) | nonce (12 bytes) | ciphertext | tag (16)

with the version byte as associated data. GCM requires a nonce never repeated
under one key, not an unpredictable one; nonces come from `nonce_source`,
os.urandom by default (the one call into the OS this core makes; a simulation
may pass a deterministic source).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._errors import ProtocolError

#: First byte of a sealed blob.
SEALED_VERSION = 0x81
NONCE_BYTES = 12
TAG_BYTES = 16
#: Bytes a seal adds to its plaintext.
SEAL_OVERHEAD = 1 + NONCE_BYTES + TAG_BYTES

_KEY_SIZES = (16, 24, 32)


class AuthenticationError(ProtocolError):
    """No installed key opens this blob."""


def _check_key(key: bytes) -> bytes:
    if len(key) not in _KEY_SIZES:
        raise ValueError(f"keyring keys must be 16, 24 or 32 bytes, got {len(key)}")
    return bytes(key)


class Keyring:
    """Installed keys, the first of which is primary."""

    __slots__ = ("_ciphers", "_keys", "_nonce_source")

    def __init__(
        self,
        primary: bytes,
        *,
        others: Sequence[bytes] = (),
        nonce_source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._keys: list[bytes] = []
        self._ciphers: dict[bytes, AESGCM] = {}
        self._nonce_source = nonce_source
        self.install(primary)
        for key in others:
            self.install(key)

    @property
    def keys(self) -> list[bytes]:
        """Installed keys, primary first."""
        return list(self._keys)

    @property
    def primary(self) -> bytes:
        return self._keys[0]

    def install(self, key: bytes) -> None:
        """Accept `key` for opening; the primary key is unchanged."""
        key = _check_key(key)
        if key not in self._ciphers:
            self._keys.append(key)
            self._ciphers[key] = AESGCM(key)

    def use(self, key: bytes) -> None:
        """Make an installed key primary."""
        if key not in self._ciphers:
            raise ValueError("cannot use a key that is not installed")
        self._keys.remove(key)
        self._keys.insert(0, key)

    def remove(self, key: bytes) -> None:
        """Forget a key; the primary key cannot be removed."""
        if key == self._keys[0]:
            raise ValueError("cannot remove the primary key")
        if key in self._ciphers:
            self._keys.remove(key)
            del self._ciphers[key]

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt with the primary key."""
        nonce = self._nonce_source(NONCE_BYTES)
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"nonce source must return {NONCE_BYTES} bytes, got {len(nonce)}")
        header = bytes((SEALED_VERSION,))
        sealed = self._ciphers[self._keys[0]].encrypt(nonce, plaintext, header)
        return header + nonce + sealed

    def open(self, blob: bytes) -> bytes:
        """Decrypt with any installed key; AuthenticationError if none fits."""
        if len(blob) < SEAL_OVERHEAD or blob[0] != SEALED_VERSION:
            raise AuthenticationError("not a sealed blob")
        nonce = blob[1 : 1 + NONCE_BYTES]
        body = blob[1 + NONCE_BYTES :]
        header = blob[:1]
        for key in self._keys:
            try:
                return self._ciphers[key].decrypt(nonce, body, header)
            except InvalidTag:
                continue
        raise AuthenticationError("no installed key authenticates this blob")
