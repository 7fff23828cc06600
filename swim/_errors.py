"""The two error families at the swim boundary.

A peer that sends garbage is not a bug of ours: its packet is dropped and
counted, and decoders signal that with `ProtocolError`. Misuse of our own API
(a key of the wrong length, removing the primary key) raises plain
`ValueError` with an exact message.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Bytes from the network could not be decoded, authenticated or accepted."""
