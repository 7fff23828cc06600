"""Wire codecs (pure): records as msgpack, and length-prefixed frames.

Two error families, as at every boundary: :class:`WireError` means the peer
sent something malformed (drop it, count it, go on); anything else raised from
here is a bug of ours.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs
import msgpack

from ._table import (
    AppRecord,
    IPAddress,
    Labels,
    RealAddress,
    ServiceRecord,
    VirtualAddress,
    ip_address,
    reserved_reason,
)

#: Largest control-API frame accepted.
MAX_FRAME_BYTES = 16 * 1024 * 1024
_HEADER = struct.Struct("!I")

#: Arrays and maps, and their items, one decoded message may hold: a peer's
#: few bytes per empty array must not become gigabytes of Python objects.
MAX_OBJECTS = 2_000_000

#: Bounds of a record's texts, in UTF-8 bytes: names and ids (a DNS name fits),
#: label keys and values (as Kubernetes'), and labels per record.  A record is
#: then at most about 12 KB, so RECORDS_PER_FRAME of them always fit a frame.
MAX_TEXT_BYTES = 255
MAX_LABEL_KEY_BYTES = 63
MAX_LABEL_VALUE_BYTES = 255
MAX_LABELS = 32
RECORDS_PER_FRAME = 1000


class WireError(ValueError):
    """Malformed bytes from a peer."""


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


#: Packed bytes of the items in one part of a listing reply: a quarter of a frame.
LISTING_PART_BYTES = MAX_FRAME_BYTES // 4


def runs_under(items: Sequence[object], budget: int) -> list[list[object]]:
    """*items* in order, in runs whose packed sizes add up to at most *budget*
    (an item larger than that alone in its run); at least one run."""
    runs: list[list[object]] = [[]]
    size = 0
    for item in items:
        cost = len(pack(item))
        if runs[-1] and size + cost > budget:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += cost
    return runs


def pack_packed_array(items: Sequence[bytes]) -> bytes:
    """An array of objects each packed by pack() already: pack(list) of them."""
    header: bytes = msgpack.Packer(use_bin_type=True).pack_array_header(len(items))
    return header + b"".join(items)


def unpack(data: bytes) -> Any:
    left = [MAX_OBJECTS]

    def counted(items: Any) -> Any:
        left[0] -= len(items) + 1
        if left[0] < 0:
            raise WireError(f"message holds more than {MAX_OBJECTS} objects")
        return items

    cap = min(MAX_OBJECTS, len(data))  # no header may promise more items than bytes
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            max_array_len=cap,
            max_map_len=cap,
            list_hook=counted,
            object_hook=counted,
        )
    except WireError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise WireError(f"undecodable message: {_why(exc)}") from None


def _why(exc: Exception) -> str:
    """What a decoder's exception says, or its kind where it says nothing
    (msgpack's FormatError on a reserved byte)."""
    return str(exc) or type(exc).__name__


def frame(obj: object) -> bytes:
    """One length-prefixed message."""
    body = pack(obj)
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"message of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Reassembles length-prefixed messages from a byte stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        messages: list[Any] = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME_BYTES:
                raise WireError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            messages.append(unpack(body))
        return messages


# -- records ---------------------------------------------------------------


#: C0 and C1 control characters: from a peer they would reach terminals
#: (escape sequences in `axnet services`) and forge log lines (newlines).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
#: Control characters, and the marks that reorder what a terminal shows
#: (a right-to-left override would make a listing lie).
_UNSHOWN = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """*text* fit for a terminal: bytes that were not UTF-8 (a command line
    may hold any) and control characters written as Python escapes."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    shown = raw.decode("utf-8", "backslashreplace")
    return _UNSHOWN.sub(lambda m: ascii(m.group())[1:-1], shown)


def has_control(text: str) -> bool:
    """Whether *text* holds a C0 or C1 control character (never on the wire)."""
    return _CONTROL.search(text) is not None


def text_from_wire(value: object, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """A string of at most *limit* UTF-8 bytes, without control characters;
    WireError otherwise."""
    if not isinstance(value, str):
        raise WireError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > limit or len(value.encode(errors="replace")) > limit:
        raise WireError(f"{what} is longer than {limit} bytes")
    if has_control(value):
        raise WireError(f"{what} contains a control character: {value!r:.80}")
    return value


def labels_from_wire(value: object) -> Labels:
    """At most MAX_LABELS ``[key, value]`` pairs of bounded strings."""
    if not isinstance(value, list | tuple):
        raise WireError("labels must be a list")
    if len(value) > MAX_LABELS:
        raise WireError(f"more than {MAX_LABELS} labels")
    out: list[tuple[str, str]] = []
    for item in value:
        if not (isinstance(item, list | tuple) and len(item) == 2):
            raise WireError("a label must be a [key, value] pair")
        k, v = item
        out.append(
            (
                text_from_wire(k, "a label key", MAX_LABEL_KEY_BYTES),
                text_from_wire(v, "a label value", MAX_LABEL_VALUE_BYTES),
            )
        )
    return tuple(out)


def record_to_wire(record: AppRecord | ServiceRecord) -> list[object]:
    if isinstance(record, AppRecord):
        return [
            "a",
            record.app_id,
            record.node,
            str(record.vip),
            str(record.real_host),
            record.port_lo,
            record.port_hi,
            record.name,
            [list(x) for x in record.labels],
            record.version,
            record.deleted,
            record.deleted_at,
        ]
    return [
        "s",
        str(record.virtual.ip),
        record.virtual.port,
        str(record.real.host),
        record.real.port,
        record.node,
        record.app_id,
        record.name,
        [list(x) for x in record.labels],
        record.version,
        record.deleted,
        record.deleted_at,
    ]


def port_from_wire(value: object) -> int:
    """A port number as it came in: a plain int 0-65535; WireError otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise WireError(f"bad port {value!r}")
    return value


def block_from_wire(value: object) -> tuple[int, int]:
    """A client port block as it came in: [lo, hi], ports with lo <= hi."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise WireError(f"bad port block {value!r}: expected [lo, hi]")
    lo, hi = port_from_wire(value[0]), port_from_wire(value[1])
    if lo > hi:
        raise WireError(f"bad port block {value!r}: lo above hi")
    return lo, hi


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise WireError(f"expected a string, got {type(value).__name__}")
    return value


def int_from_wire(value: object) -> int:
    """A plain int as it came in (no bool); WireError otherwise."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"expected an integer, got {type(value).__name__}")
    return value


#: Versions from the wire stay below this, so that a node's next write
#: (one above the highest it has seen) still fits msgpack's 64 bits.
MAX_VERSION = 2**63 - 1


def _version(value: object) -> int:
    version = int_from_wire(value)
    if not 0 <= version <= MAX_VERSION:
        raise WireError(f"version out of range: {version}")
    return version


def _float(value: object) -> float:
    """A finite number (a NaN tombstone time would never expire)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(f"expected a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise WireError(f"expected a finite number, got {number}")
    return number


@functools.lru_cache(maxsize=65536)
def _parse_ip(text: str) -> IPAddress:
    # A table's records share few addresses (a node's, its apps'); parsing
    # one takes microseconds, and a push-pull can carry 100 000 records.
    return ip_address(text)


def ip_from_wire(value: object) -> Any:
    """An IP address as it came in; WireError otherwise."""
    try:
        return _parse_ip(_str(value))
    except ValueError:
        raise WireError(f"bad IP address {value!r}") from None


def _vip(value: object) -> Any:
    """A virtual IP: never loopback, unspecified, multicast…, which every
    app's connects to would then be redirected from."""
    ip = ip_from_wire(value)
    reason = reserved_reason(ip)
    if reason is not None:
        raise WireError(f"{ip} cannot be a virtual IP: {reason}")
    return ip


def record_wire_key(wire: list[object]) -> tuple[object, ...]:
    """The key of a record in wire form (record_to_wire's): a newer record
    of the same key supersedes it."""
    return (wire[0], wire[1]) if wire[0] == "a" else (wire[0], wire[1], wire[2])


def record_from_wire(data: object) -> AppRecord | ServiceRecord:
    """Decode one record; raises :class:`WireError` on anything malformed."""
    if not isinstance(data, list) or not data:
        raise WireError("a record must be a non-empty list")
    kind = data[0]
    if kind == "a" and len(data) == 12:
        _, app_id, node, vip, real_host, lo, hi, name, labels, version, deleted, at = data
        lo_port, hi_port = port_from_wire(lo), port_from_wire(hi)
        if lo_port > hi_port:
            raise WireError("port block ends before it starts")
        return AppRecord(
            app_id=text_from_wire(app_id, "app id"),
            node=text_from_wire(node, "node name"),
            vip=_vip(vip),
            real_host=ip_from_wire(real_host),
            port_lo=lo_port,
            port_hi=hi_port,
            name=text_from_wire(name, "name"),
            labels=labels_from_wire(labels),
            version=_version(version),
            deleted=bool(deleted),
            deleted_at=_float(at),
        )
    if kind == "s" and len(data) == 12:
        _, vip, vport, real_host, real_port, node, app_id, name, labels, version, deleted, at = data
        return ServiceRecord(
            virtual=VirtualAddress(ip=_vip(vip), port=port_from_wire(vport)),
            real=RealAddress(host=ip_from_wire(real_host), port=port_from_wire(real_port)),
            node=text_from_wire(node, "node name"),
            app_id=text_from_wire(app_id, "app id"),
            name=text_from_wire(name, "name"),
            labels=labels_from_wire(labels),
            version=_version(version),
            deleted=bool(deleted),
            deleted_at=_float(at),
        )
    raise WireError(f"unknown record kind {kind!r} or wrong length {len(data)}")


@attrs.frozen
class Decoded:
    """Records that decoded, and how many did not (with the first reason)."""

    records: list[AppRecord | ServiceRecord]
    dropped: int = 0
    first_error: str = ""


def records_from_wire(items: Iterable[object], *, max_dropped: int | None = None) -> Decoded:
    """The records among *items* that decode; the others counted.  Past
    *max_dropped* bad ones, WireError: a source that sends mostly junk."""
    records: list[AppRecord | ServiceRecord] = []
    dropped, first = 0, ""
    for item in items:
        try:
            records.append(record_from_wire(item))
        except WireError as exc:
            dropped += 1
            first = first or str(exc)[:200]
            if max_dropped is not None and dropped > max_dropped:
                raise WireError(
                    f"more than {max_dropped} malformed records; first: {first}"
                ) from None
    return Decoded(records=records, dropped=dropped, first_error=first)


#: Arrays and maps, and their items, in one record of a push-pull state: a
#: record holds about 15, 150 with the most labels.
MAX_RECORD_OBJECTS = 1000

#: The same in a whole state: a record costs one per 3 bytes at most, so a
#: full 20 MB state of real records fits; junk is refused long before.
MAX_STATE_OBJECTS = 8_000_000

#: Malformed records a state may hold before it is refused whole.
MAX_STATE_DROPPED = 1000


def records_from_state(data: bytes) -> Decoded:
    """The records of a push-pull state (an array of records), decoded one at
    a time: the state may be 20 MB, and only records that decode are kept.
    WireError when it is not such an array, or it holds mostly junk (nested
    past any record's size, past MAX_STATE_OBJECTS, past MAX_STATE_DROPPED
    bad records, or followed by anything)."""
    if not data:
        return Decoded(records=[])
    record_left, state_left = [0], [MAX_STATE_OBJECTS]

    def counted(items: Any) -> Any:
        cost = len(items) + 1
        record_left[0] -= cost
        state_left[0] -= cost
        if record_left[0] < 0:
            raise WireError(f"a record holds more than {MAX_RECORD_OBJECTS} objects")
        if state_left[0] < 0:
            raise WireError(f"push-pull state holds more than {MAX_STATE_OBJECTS} objects")
        return items

    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=False,
        max_buffer_size=len(data),
        max_array_len=min(MAX_RECORD_OBJECTS, len(data)),
        max_map_len=min(MAX_RECORD_OBJECTS, len(data)),
        list_hook=counted,
        object_hook=counted,
    )
    unpacker.feed(data)
    try:
        count = unpacker.read_array_header()
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise WireError(f"push-pull state must be an array of records ({exc})") from None
    if count > len(data):
        raise WireError("push-pull state promises more records than it has bytes")

    def items() -> Iterator[object]:
        for _ in range(count):
            record_left[0] = MAX_RECORD_OBJECTS
            yield unpacker.unpack()

    try:
        decoded = records_from_wire(items(), max_dropped=MAX_STATE_DROPPED)
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"undecodable push-pull state: {_why(exc)}") from None
    if unpacker.tell() != len(data):
        raise WireError("push-pull state has bytes after its records")
    return decoded
