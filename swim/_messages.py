"""Wire messages and their msgpack codec.

Theory of operation: every message is a msgpack array whose first element is
a small integer tag. A datagram is a compound packet,

    PLAIN_VERSION (1 byte) | msgpack array of messages

so one probe can carry the piggybacked broadcasts; the array header is
written by hand so the broadcast queue can hold messages already encoded and
account their exact size. A stream (push-pull, TCP ping) carries the same
envelope holding exactly one message. With a key ring the whole envelope is
sealed (see _keyring).

Decoding trusts nothing: any failure — msgpack error, wrong arity, wrong type,
out-of-range number — becomes ProtocolError and nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, TypeAlias

import attrs
import msgpack

from ._config import MAX_META_BYTES, MAX_PUSH_PULL_BYTES
from ._errors import ProtocolError

#: First byte of an unsealed envelope.
PLAIN_VERSION = 0x01

Address: TypeAlias = tuple[str, int]

_MAX_NAME = 255
_MAX_U64 = 2**64 - 1
#: Incarnations from the wire stay below this, so that ours, one above the
#: highest we were accused at, still fits the wire's unsigned 64 bits.
MAX_INCARNATION = 2**63 - 1
#: Objects (array elements) one envelope may decode to: 20 MB of empty arrays
#: must not become gigabytes of Python lists.  A push-pull of a member
#: costs 7, so this is room for ~70 000 members.
MAX_ENVELOPE_OBJECTS = 500_000


class MemberState(enum.IntEnum):
    """Where a member stands in the eyes of one observer."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


class _Tag(enum.IntEnum):
    PING = 1
    PING_REQ = 2
    ACK = 3
    NACK = 4
    SUSPECT = 5
    ALIVE = 6
    DEAD = 7
    USER = 8
    PUSH_PULL = 9


@attrs.frozen(kw_only=True)
class Ping:
    """Direct probe of `target`; answered with Ack(seq)."""

    seq: int
    target: str
    source: str


@attrs.frozen(kw_only=True)
class PingReq:
    """Ask the receiver to probe `target` for `source` (indirect probe)."""

    seq: int
    target: str
    target_address: Address
    source: str
    nack: bool


@attrs.frozen(kw_only=True)
class Ack:
    seq: int


@attrs.frozen(kw_only=True)
class Nack:
    """Sent by an indirect prober whose own probe got no ack: 'I am alive, it is not'."""

    seq: int


@attrs.frozen(kw_only=True)
class Suspect:
    incarnation: int
    member: str
    accuser: str


@attrs.frozen(kw_only=True)
class Alive:
    incarnation: int
    member: str
    address: Address
    meta: bytes


@attrs.frozen(kw_only=True)
class Dead:
    """`member` failed, or left when `accuser == member`."""

    incarnation: int
    member: str
    accuser: str


@attrs.frozen(kw_only=True)
class UserBroadcast:
    """Application data; (origin, key) at a higher (boot, seq) supersedes."""

    origin: str
    key: bytes
    boot: int
    seq: int
    payload: bytes


@attrs.frozen(kw_only=True)
class PushPullEntry:
    name: str
    address: Address
    incarnation: int
    state: MemberState
    meta: bytes


@attrs.frozen(kw_only=True)
class PushPull:
    """Full state exchange: every member we know plus the delegate's state."""

    join: bool
    members: tuple[PushPullEntry, ...]
    user_state: bytes


Message: TypeAlias = Ping | PingReq | Ack | Nack | Suspect | Alive | Dead | UserBroadcast | PushPull


def _fields(message: Message) -> list[Any]:
    match message:
        case Ping():
            return [_Tag.PING, message.seq, message.target, message.source]
        case PingReq():
            host, port = message.target_address
            return [
                _Tag.PING_REQ,
                message.seq,
                message.target,
                host,
                port,
                message.source,
                message.nack,
            ]
        case Ack():
            return [_Tag.ACK, message.seq]
        case Nack():
            return [_Tag.NACK, message.seq]
        case Suspect():
            return [_Tag.SUSPECT, message.incarnation, message.member, message.accuser]
        case Alive():
            host, port = message.address
            return [_Tag.ALIVE, message.incarnation, message.member, host, port, message.meta]
        case Dead():
            return [_Tag.DEAD, message.incarnation, message.member, message.accuser]
        case UserBroadcast():
            return [
                _Tag.USER,
                message.origin,
                message.key,
                message.boot,
                message.seq,
                message.payload,
            ]
        case PushPull():
            return [
                _Tag.PUSH_PULL,
                message.join,
                [
                    [e.name, e.address[0], e.address[1], e.incarnation, int(e.state), e.meta]
                    for e in message.members
                ],
                message.user_state,
            ]
        case _:  # pragma: no cover - exhaustive
            raise TypeError(f"not a swim message: {message!r}")


def encode_message(message: Message) -> bytes:
    """msgpack bytes of one message, without envelope."""
    return msgpack.packb(_fields(message), use_bin_type=True)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 2**16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def compound(encoded: Sequence[bytes]) -> bytes:
    """Unsealed envelope holding already encoded messages."""
    return bytes((PLAIN_VERSION,)) + _array_header(len(encoded)) + b"".join(encoded)


def compound_overhead(n: int) -> int:
    """Envelope bytes around `n` messages (version byte + array header)."""
    return 1 + len(_array_header(n))


# -- decoding ---------------------------------------------------------------


def _int(value: object, low: int = 0, high: int = _MAX_U64) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"expected an integer in [{low}, {high}], got {value!r:.40}")
    return value


def _str(value: object, limit: int = _MAX_NAME) -> str:
    # Bounded in encoded bytes, as it travels: 255 characters can be 1020.
    if type(value) is not str or len(value) > limit or len(value.encode()) > limit:
        raise ProtocolError(f"expected a string of at most {limit} bytes")
    # No control characters: names reach terminals and log lines.
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
        raise ProtocolError(f"control character in {value!r:.80}")
    return value


def _member(value: object) -> str:
    """A member's name: a string as _str, never empty (no one is named "")."""
    name = _str(value)
    if not name:
        raise ProtocolError("empty member name")
    return name


def _bin(value: object, limit: int) -> bytes:
    if type(value) is not bytes or len(value) > limit:
        raise ProtocolError(f"expected bytes of at most {limit}")
    return value


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise ProtocolError("expected a boolean")
    return value


def _addr(host: object, port: object) -> Address:
    # The host is opaque here (a simulated network names hosts as it likes);
    # a driver on real sockets sends only to IP literals.
    return (_str(host), _int(port, 0, 65535))


def _incarnation(value: object) -> int:
    return _int(value, 0, MAX_INCARNATION)


def _arity(fields: list[Any], n: int) -> None:
    if len(fields) != n:
        raise ProtocolError(f"message tag {fields[0]} needs {n} fields, got {len(fields)}")


def _message(fields: object) -> Message:
    if type(fields) is not list or not fields:
        raise ProtocolError("a message is a non-empty array")
    tag = _int(fields[0], 1, max(_Tag))
    match _Tag(tag):
        case _Tag.PING:
            _arity(fields, 4)
            return Ping(seq=_int(fields[1]), target=_str(fields[2]), source=_str(fields[3]))
        case _Tag.PING_REQ:
            _arity(fields, 7)
            return PingReq(
                seq=_int(fields[1]),
                target=_str(fields[2]),
                target_address=_addr(fields[3], fields[4]),
                source=_str(fields[5]),
                nack=_bool(fields[6]),
            )
        case _Tag.ACK:
            _arity(fields, 2)
            return Ack(seq=_int(fields[1]))
        case _Tag.NACK:
            _arity(fields, 2)
            return Nack(seq=_int(fields[1]))
        case _Tag.SUSPECT:
            _arity(fields, 4)
            return Suspect(
                incarnation=_incarnation(fields[1]),
                member=_member(fields[2]),
                accuser=_str(fields[3]),
            )
        case _Tag.ALIVE:
            _arity(fields, 6)
            return Alive(
                incarnation=_incarnation(fields[1]),
                member=_member(fields[2]),
                address=_addr(fields[3], fields[4]),
                meta=_bin(fields[5], MAX_META_BYTES),
            )
        case _Tag.DEAD:
            _arity(fields, 4)
            return Dead(
                incarnation=_incarnation(fields[1]),
                member=_member(fields[2]),
                accuser=_str(fields[3]),
            )
        case _Tag.USER:
            _arity(fields, 6)
            return UserBroadcast(
                origin=_str(fields[1]),
                key=_bin(fields[2], _MAX_NAME),
                boot=_int(fields[3]),
                seq=_int(fields[4]),
                payload=_bin(fields[5], MAX_PUSH_PULL_BYTES),
            )
        case _Tag.PUSH_PULL:
            _arity(fields, 4)
            raw = fields[2]
            if type(raw) is not list:
                raise ProtocolError("push-pull members must be an array")
            entries = []
            for item in raw:
                if type(item) is not list or len(item) != 6:
                    raise ProtocolError("push-pull member needs 6 fields")
                entries.append(
                    PushPullEntry(
                        name=_member(item[0]),
                        address=_addr(item[1], item[2]),
                        incarnation=_incarnation(item[3]),
                        state=MemberState(_int(item[4], 0, max(MemberState))),
                        meta=_bin(item[5], MAX_META_BYTES),
                    )
                )
            return PushPull(
                join=_bool(fields[1]),
                members=tuple(entries),
                user_state=_bin(fields[3], MAX_PUSH_PULL_BYTES),
            )


def _unpack(body: bytes) -> object:
    left = [MAX_ENVELOPE_OBJECTS]

    def counted(items: list[Any]) -> list[Any]:
        left[0] -= len(items) + 1
        if left[0] < 0:
            raise ProtocolError(f"envelope holds more than {MAX_ENVELOPE_OBJECTS} objects")
        return items

    try:
        return msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_array_len=MAX_ENVELOPE_OBJECTS,
            max_map_len=0,  # the protocol has none
            list_hook=counted,
        )
    except ProtocolError:
        raise
    except (ValueError, msgpack.UnpackException) as exc:  # ExtraData, FormatError, StackError...
        raise ProtocolError(f"undecodable msgpack: {type(exc).__name__}") from exc


def decode_envelope(data: bytes) -> list[Message]:
    """Messages of an unsealed envelope; ProtocolError on anything wrong."""
    if len(data) > MAX_PUSH_PULL_BYTES:
        raise ProtocolError(f"envelope of {len(data)} bytes exceeds MAX_PUSH_PULL_BYTES")
    if not data or data[0] != PLAIN_VERSION:
        raise ProtocolError("unknown envelope version")
    items = _unpack(data[1:])
    if type(items) is not list:
        raise ProtocolError("envelope must hold an array of messages")
    return [_message(item) for item in items]
