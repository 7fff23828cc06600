"""What rides the gossip (pure): service records and member metadata, packed.

A record of ours is broadcast under a key that names what it describes
(``s|vip|port``, ``a|app_id``), so a newer version supersedes the older one in
every member's broadcast queue.  The whole table, tombstones included, is the
push-pull state.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._gossip_address import ip_literal
from ._table import AppRecord, Labels, ServiceRecord
from ._wire import (
    MAX_LABEL_KEY_BYTES,
    MAX_LABEL_VALUE_BYTES,
    WireError,
    pack,
    pack_packed_array,
    record_to_wire,
    text_from_wire,
    unpack,
)


def record_key(record: AppRecord | ServiceRecord) -> bytes:
    """The broadcast key of a record: a newer version supersedes an older one."""
    if isinstance(record, ServiceRecord):
        return f"s|{record.virtual.ip}|{record.virtual.port}".encode()
    return f"a|{record.app_id}".encode()


def encode_record(record: AppRecord | ServiceRecord) -> bytes:
    return pack(record_to_wire(record))


def encode_state(records: Sequence[AppRecord | ServiceRecord]) -> bytes:
    """The push-pull state: every record, tombstones included."""
    return pack_packed_array([encode_record(r) for r in records])


def encode_meta(address: str, labels: Labels) -> bytes:
    """Member metadata: the node's real address and its labels."""
    return pack({"a": address, "l": [list(pair) for pair in labels]})


def decode_meta(meta: bytes) -> tuple[str | None, dict[str, str]]:
    """(real address, labels) from member metadata; nothing for garbage.

    What `axnet members` shows of a peer is held to what a daemon itself
    accepts: an IP address, and labels as `--label` takes them.  Anything
    else (escape sequences, newlines) would reach the terminal as it came.
    """
    try:
        value = unpack(meta) if meta else None
    except WireError:
        return None, {}
    if not isinstance(value, dict):
        return None, {}
    address = value.get("a")
    if not (isinstance(address, str) and ip_literal(address)):
        address = None
    labels: dict[str, str] = {}
    raw = value.get("l")
    if isinstance(raw, list):
        for pair in raw:
            if not (isinstance(pair, list) and len(pair) == 2):
                continue
            try:
                key = text_from_wire(pair[0], "a label key", MAX_LABEL_KEY_BYTES)
                labels[key] = text_from_wire(pair[1], "a label value", MAX_LABEL_VALUE_BYTES)
            except WireError:
                continue
    return address, labels


__all__ = ["decode_meta", "encode_meta", "encode_record", "encode_state", "record_key"]
