"""Codec: round trips, and arbitrary bytes raise only ProtocolError."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from swim import MemberState, ProtocolError, decode_envelope
from swim._messages import (
    MAX_ENVELOPE_OBJECTS,
    Ack,
    Alive,
    Dead,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    PushPullEntry,
    Suspect,
    UserBroadcast,
    _Tag,
    compound,
    encode_message,
)

#: Control characters are refused (test_names_with_control_characters_are_refused).
names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=20)
#: Members are never named "" (test_an_empty_member_name_is_refused).
members = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
#: Room for one more: a member refutes one above the incarnation it was accused at.
incarnations = st.integers(min_value=0, max_value=2**63 - 1)
addresses = st.tuples(names, st.integers(min_value=0, max_value=65535))
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Ping, seq=u64, target=names, source=names),
    st.builds(
        PingReq, seq=u64, target=names, target_address=addresses, source=names, nack=st.booleans()
    ),
    st.builds(Ack, seq=u64),
    st.builds(Nack, seq=u64),
    st.builds(Suspect, incarnation=incarnations, member=members, accuser=names),
    st.builds(
        Alive,
        incarnation=incarnations,
        member=members,
        address=addresses,
        meta=st.binary(max_size=64),
    ),
    st.builds(Dead, incarnation=incarnations, member=members, accuser=names),
    st.builds(
        UserBroadcast,
        origin=names,
        key=st.binary(max_size=16),
        boot=u64,
        seq=u64,
        payload=st.binary(max_size=64),
    ),
    st.builds(
        PushPull,
        join=st.booleans(),
        members=st.lists(
            st.builds(
                PushPullEntry,
                name=members,
                address=addresses,
                incarnation=incarnations,
                state=st.sampled_from(MemberState),
                meta=st.binary(max_size=8),
            ),
            max_size=4,
        ).map(tuple),
        user_state=st.binary(max_size=64),
    ),
)


@given(st.lists(messages, max_size=5))
def test_round_trip(batch: list[Message]) -> None:
    assert decode_envelope(compound([encode_message(m) for m in batch])) == batch


@pytest.mark.parametrize("name", ["b\x1b]0;owned\x07", "b\nforged", "\x00", "b\x9b"])
def test_names_with_control_characters_are_refused(name: str) -> None:
    # Member names reach terminals (`axnet members`) and log lines.
    packet = compound([encode_message(Dead(incarnation=1, member=name, accuser="a"))])
    with pytest.raises(ProtocolError, match="control character"):
        decode_envelope(packet)


def test_an_empty_member_name_is_refused() -> None:
    # A peer once got a member named "" into every table (a fuzzer's).
    for message in (
        Alive(incarnation=1, member="", address=("10.0.0.1", 7946), meta=b""),
        Dead(incarnation=1, member="", accuser="a"),
        PushPull(
            join=False,
            members=(
                PushPullEntry(
                    name="",
                    address=("10.0.0.1", 7946),
                    incarnation=1,
                    state=MemberState.ALIVE,
                    meta=b"",
                ),
            ),
            user_state=b"",
        ),
    ):
        with pytest.raises(ProtocolError, match="empty member name"):
            decode_envelope(compound([encode_message(message)]))


@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_envelope(data)


@given(st.binary(max_size=512))
def test_arbitrary_bytes_after_version_byte(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_envelope(b"\x01" + data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=7) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=20,
)


@given(st.lists(msgpack_values, max_size=4))
def test_well_formed_msgpack_of_wrong_shape(values: list[object]) -> None:
    with contextlib.suppress(ProtocolError):
        decode_envelope(b"\x01" + msgpack.packb(values, use_bin_type=True))


@given(st.lists(messages, min_size=1, max_size=3), st.data())
def test_mutated_valid_packets(batch: list[Message], data: st.DataObject) -> None:
    packet = bytearray(compound([encode_message(m) for m in batch]))
    index = data.draw(st.integers(min_value=0, max_value=len(packet) - 1))
    packet[index] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(packet)))
    with contextlib.suppress(ProtocolError):
        decode_envelope(bytes(packet[:cut]))


def test_protocol_error_is_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)
    with pytest.raises(ProtocolError):
        decode_envelope(b"")
    with pytest.raises(ProtocolError):
        decode_envelope(b"\x01" + msgpack.packb([[1, True, "a", "b"]]))  # bool is not a seq


def test_an_incarnation_with_no_room_above_is_refused() -> None:
    alive = [int(_Tag.ALIVE), 2**63, "m", "10.0.0.1", 7946, b""]
    assert decode_envelope(
        b"\x01" + msgpack.packb([[*alive[:1], 2**63 - 1, *alive[2:]]], use_bin_type=True)
    )
    with pytest.raises(ProtocolError, match="expected an integer"):
        decode_envelope(b"\x01" + msgpack.packb([alive], use_bin_type=True))


def test_an_envelope_of_too_many_objects_is_refused_before_it_is_built() -> None:
    # 1.2 MB of empty arrays would be ~70 MB of Python lists; far bigger
    # frames fit MAX_PUSH_PULL_BYTES.
    flat = msgpack.packb([[]] * (MAX_ENVELOPE_OBJECTS + 1))
    nested = msgpack.packb([[[]] * 1000] * (MAX_ENVELOPE_OBJECTS // 1000 + 1))
    for body in (flat, nested):
        with pytest.raises(ProtocolError, match=r"objects|undecodable"):
            decode_envelope(b"\x01" + body)
