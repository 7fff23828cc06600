"""Wire codecs: records round-trip, garbage raises only WireError, frames reassemble."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from axnet._table import (
    AppRecord,
    IPAddress,
    RealAddress,
    ServiceRecord,
    VirtualAddress,
    reserved_reason,
)
from axnet._wire import (
    MAX_FRAME_BYTES,
    MAX_LABEL_KEY_BYTES,
    MAX_LABEL_VALUE_BYTES,
    MAX_LABELS,
    MAX_OBJECTS,
    MAX_TEXT_BYTES,
    MAX_VERSION,
    RECORDS_PER_FRAME,
    FrameDecoder,
    WireError,
    frame,
    pack,
    pack_packed_array,
    record_from_wire,
    record_to_wire,
    runs_under,
    unpack,
    visible,
)


def _not_mapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # The decoder unmaps ::ffff:a.b.c.d on purpose; records never hold one.
    return not (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None)


ips: st.SearchStrategy[IPAddress] = st.ip_addresses().filter(_not_mapped)
vips = ips.filter(lambda ip: reserved_reason(ipaddress.ip_network(ip)) is None)
ports = st.integers(0, 65535)
#: Control characters never cross the wire (test_text_refuses_control_characters).
texts = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=20)
labels = st.lists(st.tuples(texts, texts), max_size=4).map(tuple)
versions = st.integers(0, MAX_VERSION)
times = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def app_records(draw: st.DrawFn) -> AppRecord:
    lo = draw(ports)
    return AppRecord(
        app_id=draw(texts),
        node=draw(texts),
        vip=draw(vips),
        real_host=draw(ips),
        port_lo=lo,
        port_hi=draw(st.integers(lo, 65535)),
        name=draw(texts),
        labels=draw(labels),
        version=draw(versions),
        deleted=draw(st.booleans()),
        deleted_at=draw(times),
    )


@st.composite
def service_records(draw: st.DrawFn) -> ServiceRecord:
    return ServiceRecord(
        virtual=VirtualAddress(ip=draw(vips), port=draw(ports)),
        real=RealAddress(host=draw(ips), port=draw(ports)),
        node=draw(texts),
        app_id=draw(texts),
        name=draw(texts),
        labels=draw(labels),
        version=draw(versions),
        deleted=draw(st.booleans()),
        deleted_at=draw(times),
    )


records = st.one_of(app_records(), service_records())

# Anything msgpack can carry, including the shapes a record has.
msgpack_objects: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.sampled_from(["a", "s", "10.0.0.1", "::1"]),
    lambda children: (
        st.lists(children, max_size=13) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=30,
)


# -- records ---------------------------------------------------------------


@given(records)
def test_record_round_trip(record: AppRecord | ServiceRecord) -> None:
    assert record_from_wire(record_to_wire(record)) == record


@given(records)
def test_record_round_trip_through_msgpack(record: AppRecord | ServiceRecord) -> None:
    assert record_from_wire(unpack(pack(record_to_wire(record)))) == record


def test_record_from_wire_unmaps_ipv4_mapped_addresses() -> None:
    wire = [
        "s",
        "::ffff:10.0.0.1",
        80,
        "::ffff:192.0.2.1",
        20000,
        "n1",
        "a1",
        "",
        [],
        1,
        False,
        0.0,
    ]
    record = record_from_wire(wire)
    assert isinstance(record, ServiceRecord)
    assert record.virtual.ip == ipaddress.IPv4Address("10.0.0.1")
    assert record.real.host == ipaddress.IPv4Address("192.0.2.1")


def _good_app_wire() -> list[Any]:
    return ["a", "a1", "n1", "10.0.0.1", "192.0.2.1", 40000, 40099, "", [], 1, False, 0.0]


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        (0, "x", "unknown record kind 'x' or wrong length 12"),
        (1, 7, "app id must be a string, got int"),
        (2, "n" * 256, "node name is longer than 255 bytes"),
        (7, "é" * 128, "name is longer than 255 bytes"),  # 256 bytes of UTF-8
        # Every app's connects to such an address would be redirected.
        (
            3,
            "127.0.0.1",
            "127.0.0.1 cannot be a virtual IP: it overlaps 127.0.0.0/8 "
            "(loopback, unspecified, link-local, multicast or reserved)",
        ),
        (
            3,
            "::",
            ":: cannot be a virtual IP: it overlaps ::/128 "
            "(loopback, unspecified, link-local, multicast or reserved)",
        ),
        (3, "10.0.0.300", "bad IP address '10.0.0.300'"),
        # A scope is one host's interface; Python takes any text there.
        (
            3,
            "2001:db8::7%\x1b[31mRED\nforged",
            "bad IP address '2001:db8::7%\\x1b[31mRED\\nforged'",
        ),
        (3, 10, "bad IP address 10"),
        (5, 70000, "bad port 70000"),
        (5, True, "bad port True"),
        (6, 39999, "port block ends before it starts"),
        (8, "k=v", "labels must be a list"),
        (8, [["k"]], "a label must be a [key, value] pair"),
        (8, [["k", 1]], "a label value must be a string, got int"),
        (8, [["k", "v"]] * 33, "more than 32 labels"),
        (8, [["k" * 64, ""]], "a label key is longer than 63 bytes"),
        (8, [["k", "v" * 256]], "a label value is longer than 255 bytes"),
        (9, 1.5, "expected an integer, got float"),
        (9, False, "expected an integer, got bool"),
        # Room above the highest version seen: a node's next write must encode.
        (9, -1, "version out of range: -1"),
        (9, MAX_VERSION + 1, f"version out of range: {MAX_VERSION + 1}"),
        (11, "now", "expected a number, got str"),
        (11, True, "expected a number, got bool"),
        (11, float("nan"), "expected a finite number, got nan"),
        (11, float("inf"), "expected a finite number, got inf"),
    ],
)
def test_record_from_wire_messages(index: int, value: object, message: str) -> None:
    wire = _good_app_wire()
    wire[index] = value
    with pytest.raises(WireError) as info:
        record_from_wire(wire)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "a record must be a non-empty list"),
        ({"a": 1}, "a record must be a non-empty list"),
        (("a",), "a record must be a non-empty list"),
        (["a", 1], "unknown record kind 'a' or wrong length 2"),
        (["s"] * 13, "unknown record kind 's' or wrong length 13"),
    ],
)
def test_record_from_wire_shape(data: object, message: str) -> None:
    with pytest.raises(WireError) as info:
        record_from_wire(data)
    assert str(info.value) == message


@pytest.mark.parametrize("text", ["web\x1b[2J", "a\nforged log line", "\x00", "del\x7f", "c1\x9b"])
def test_text_refuses_control_characters(text: str) -> None:
    # From a peer they would reach terminals and log lines as they are.
    wire = _good_app_wire()
    wire[1] = text  # the app id
    with pytest.raises(WireError, match="control character"):
        record_from_wire(wire)


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)


@given(msgpack_objects)
def test_record_from_wire_on_any_object_raises_only_wire_error(data: Any) -> None:
    try:
        record = record_from_wire(data)
    except WireError:
        return
    assert isinstance(record, AppRecord | ServiceRecord)


@given(st.lists(msgpack_objects, min_size=11, max_size=11), st.sampled_from(["a", "s"]))
def test_record_from_wire_on_right_length_lists_raises_only_wire_error(
    fields: list[Any], kind: str
) -> None:
    with contextlib.suppress(WireError):
        record_from_wire([kind, *fields])


@given(st.binary(max_size=64))
def test_record_from_wire_on_any_bytes_raises_only_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        record_from_wire(unpack(data))


# -- unpack and frames ---------------------------------------------------------


@given(st.binary(max_size=64))
def test_unpack_raises_only_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        unpack(data)


def test_unpack_rejects_trailing_bytes() -> None:
    with pytest.raises(WireError, match="undecodable message"):
        unpack(pack(1) + pack(2))


def test_an_undecodable_message_says_what_kind_of_garbage_it_is() -> None:
    # A reserved byte: msgpack's error has no text; the log line said "".
    with pytest.raises(WireError) as info:
        unpack(b"\xc1")
    assert str(info.value) == "undecodable message: FormatError"


def test_frame_is_length_prefixed_msgpack() -> None:
    data = frame({"op": "x"})
    (length,) = struct.unpack("!I", data[:4])
    assert length == len(data) - 4
    assert msgpack.unpackb(data[4:]) == {"op": "x"}


def test_frame_refuses_a_message_over_the_limit() -> None:
    with pytest.raises(ValueError, match=f"exceeds {MAX_FRAME_BYTES}"):
        frame(b"x" * (MAX_FRAME_BYTES + 1))


def test_decoder_refuses_an_announced_frame_over_the_limit() -> None:
    decoder = FrameDecoder()
    header = struct.pack("!I", MAX_FRAME_BYTES + 1)
    with pytest.raises(WireError) as info:
        decoder.feed(header)
    assert str(info.value) == f"frame of {MAX_FRAME_BYTES + 1} bytes exceeds {MAX_FRAME_BYTES}"


def test_decoder_accepts_a_frame_of_exactly_the_limit_announced() -> None:
    decoder = FrameDecoder()
    # Only the header: the decoder waits for the body instead of refusing.
    assert decoder.feed(struct.pack("!I", MAX_FRAME_BYTES)) == []


def test_decoder_waits_for_a_whole_frame() -> None:
    decoder = FrameDecoder()
    data = frame({"id": 1}) + frame([1, 2, 3])
    assert decoder.feed(data[:3]) == []
    assert decoder.feed(data[3:7]) == []
    assert decoder.feed(data[7:]) == [{"id": 1}, [1, 2, 3]]
    assert decoder.feed(b"") == []


def test_decoder_accepts_maps_with_integer_keys() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(frame({1: "x"})) == [{1: "x"}]


@given(
    st.lists(msgpack_objects, max_size=5),
    st.lists(st.integers(0, 200), max_size=10),
)
def test_decoder_reassembles_across_any_chunk_split(messages: list[Any], cuts: list[int]) -> None:
    stream = b"".join(frame(m) for m in messages)
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder()
    out: list[Any] = []
    for start, end in itertools.pairwise(bounds):
        out += decoder.feed(stream[start:end])
    expected = [unpack(pack(m)) for m in messages]  # msgpack turns tuples into lists
    assert _same(out, expected)


def _same(a: object, b: object) -> bool:
    # NaN != NaN: compare through the packed form.
    return pack(a) == pack(b)


@given(st.binary(max_size=128), st.lists(st.integers(0, 128), max_size=6))
def test_decoder_on_any_bytes_raises_only_wire_error(data: bytes, cuts: list[int]) -> None:
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    decoder = FrameDecoder()
    try:
        for start, end in itertools.pairwise(bounds):
            decoder.feed(data[start:end])
    except WireError:
        pass


@given(st.binary(max_size=64))
def test_decoder_on_any_framed_body_raises_only_wire_error(body: bytes) -> None:
    decoder = FrameDecoder()
    with contextlib.suppress(WireError):
        decoder.feed(struct.pack("!I", len(body)) + body)


def test_a_service_record_for_a_reserved_address_is_refused() -> None:
    wire = record_to_wire(
        ServiceRecord(
            virtual=VirtualAddress(ip=ipaddress.ip_address("10.0.0.1"), port=5432),
            real=RealAddress(host=ipaddress.ip_address("192.0.2.1"), port=20000),
            node="n",
            app_id="a",
            name="",
            labels=(),
            version=1,
            deleted=False,
            deleted_at=0.0,
        )
    )
    wire[1] = "127.0.0.1"
    with pytest.raises(WireError, match="cannot be a virtual IP"):
        record_from_wire(wire)


def test_a_message_of_countless_empty_arrays_is_refused_before_it_is_built() -> None:
    # Empty arrays are 1 byte each on the wire and ~60 in Python.
    half = MAX_OBJECTS // 2 + 1
    with pytest.raises(WireError, match=f"more than {MAX_OBJECTS} objects"):
        unpack(pack([[[]] * half, [[]] * half]))
    with pytest.raises(WireError, match="exceeds max_array_len"):
        unpack(b"\xdd" + struct.pack("!I", MAX_OBJECTS + 1) + b"\x90" * (MAX_OBJECTS + 1))
    assert unpack(pack({"k": [[]] * 10})) == {"k": [[]] * 10}


def test_a_frame_of_the_largest_records_fits() -> None:
    big = AppRecord(
        app_id="a" * MAX_TEXT_BYTES,
        node="n" * MAX_TEXT_BYTES,
        vip=ipaddress.ip_address("fd00::1"),
        real_host=ipaddress.ip_address("fd00::2"),
        port_lo=0,
        port_hi=65535,
        name="é" * (MAX_TEXT_BYTES // 2),
        labels=tuple(
            (f"{i:02d}" + "k" * (MAX_LABEL_KEY_BYTES - 2), "v" * MAX_LABEL_VALUE_BYTES)
            for i in range(MAX_LABELS)
        ),
        version=MAX_VERSION,
        deleted=False,
        deleted_at=0.0,
    )
    assert record_from_wire(unpack(pack(record_to_wire(big)))) == big
    frame({"push": "records", "records": [record_to_wire(big)] * RECORDS_PER_FRAME})


@given(st.lists(st.recursive(st.integers(-(2**63), 2**64 - 1) | st.text() | st.none(), st.lists)))
def test_an_array_of_packed_items_is_the_packed_array(items: list[object]) -> None:
    assert pack_packed_array([pack(item) for item in items]) == pack(items)


def test_an_array_of_packed_items_past_the_16_bit_header() -> None:
    items = list(range(70_000))
    assert pack_packed_array([pack(item) for item in items]) == pack(items)


@given(st.lists(st.text(max_size=40)), st.integers(1, 200))
def test_runs_under_a_budget_keep_every_item_in_order(items: list[str], budget: int) -> None:
    runs = runs_under(items, budget)
    assert [item for run in runs for item in run] == items
    assert all(run for run in runs) or runs == [[]]
    for run in runs:  # within the budget, unless one item alone is over it
        assert len(run) == 1 or sum(len(pack(item)) for item in run) <= budget
    for before, after in itertools.pairwise(runs):  # and never split needlessly
        assert sum(len(pack(item)) for item in [*before, after[0]]) > budget


def test_visible_text_escapes_what_a_terminal_would_act_on() -> None:
    assert visible("plain café") == "plain café"
    assert visible("\x1b[31mred\x07") == "\\x1b[31mred\\x07"
    assert visible(os.fsdecode(b"caf\xe9")) == "caf\\xe9"  # bytes that were not UTF-8
    assert visible("\ud800") == "\\xed\\xa0\\x80"  # a lone surrogate, from anywhere
    assert visible("\x85") == "\\x85"  # C1 controls too
    assert visible("evil\u202etxt.exe") == "evil\\u202etxt.exe"  # no reordering either
