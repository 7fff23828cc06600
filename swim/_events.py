"""What a core hands its driver: events, datagrams and stream requests."""

from __future__ import annotations

import enum
from typing import TypeAlias

import attrs

from ._messages import Address, MemberState


@attrs.frozen(kw_only=True)
class Member:
    """One member as the local core sees it."""

    name: str
    address: Address
    incarnation: int
    state: MemberState
    meta: bytes = b""


@attrs.frozen(kw_only=True)
class MemberJoined:
    """A member became known, or came back after being dead or left."""

    member: Member


@attrs.frozen(kw_only=True)
class MemberUpdated:
    """A member's metadata or address changed."""

    member: Member


@attrs.frozen(kw_only=True)
class MemberSuspected:
    member: Member
    accuser: str


@attrs.frozen(kw_only=True)
class MemberAlive:
    """A suspect member refuted the suspicion."""

    member: Member


@attrs.frozen(kw_only=True)
class MemberDead:
    """A member failed (suspicion timed out, or another member declared it)."""

    member: Member
    accuser: str


@attrs.frozen(kw_only=True)
class MemberLeft:
    """A member left gracefully."""

    member: Member


@attrs.frozen(kw_only=True)
class MemberReaped:
    """A failed or left member was forgotten, its timeout over: a message
    about it from now on is news of a new member."""

    member: Member


@attrs.frozen(kw_only=True)
class NameConflict:
    """Another member announces this member's own name from another address:
    names must be unique, and its messages about 'us' are ignored.  Once per
    address, and again at each join that meets it."""

    name: str
    address: Address


@attrs.frozen(kw_only=True)
class UserMessage:
    """An application broadcast from `sender` (the newest for its key)."""

    sender: str
    key: bytes
    payload: bytes


@attrs.frozen(kw_only=True)
class Delivered:
    """A `Swim.deliver` is over: every member it went to acknowledged it, but
    those `missing` (within the probe timeout)."""

    token: int
    missing: tuple[str, ...]


Event: TypeAlias = (
    MemberJoined
    | MemberUpdated
    | MemberSuspected
    | MemberAlive
    | MemberDead
    | MemberLeft
    | MemberReaped
    | NameConflict
    | UserMessage
    | Delivered
)


@attrs.frozen(kw_only=True)
class Datagram:
    """Send `data` to `dest` over UDP."""

    dest: Address
    data: bytes


class StreamPurpose(enum.Enum):
    JOIN = "join"
    PUSH_PULL = "push-pull"
    PING = "ping"


@attrs.frozen(kw_only=True)
class StreamRequest:
    """Open a stream to `dest`, send `data`, read the whole reply and pass it to
    `Swim.handle_stream_reply`; on failure call `Swim.stream_failed`."""

    dest: Address
    data: bytes
    purpose: StreamPurpose
