"""The gossip driver's pure parts: flags, key files, codecs."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path
from typing import Any

import attrs
import msgpack
import pytest

from axnet._gossip_address import DEFAULT_PORT, parse_address
from axnet._gossip_codec import decode_meta, encode_meta, encode_record, encode_state, record_key
from axnet._gossip_options import gossip_options, load_keys
from axnet._table import AppRecord, RealAddress, ServiceRecord, VirtualAddress
from axnet._wire import (
    WireError,
    pack,
    record_from_wire,
    record_to_wire,
    records_from_state,
    unpack,
)

IP = ipaddress.ip_address


def service(port: int = 80, **changes: Any) -> ServiceRecord:
    record = ServiceRecord(
        virtual=VirtualAddress(ip=IP("10.1.0.5"), port=port),
        real=RealAddress(host=IP("10.203.0.10"), port=20000),
        node="h1",
        app_id="app1",
        version=7,
    )
    return attrs.evolve(record, **changes)


def app() -> AppRecord:
    return AppRecord(
        app_id="app1",
        node="h1",
        vip=IP("10.1.0.5"),
        real_host=IP("10.203.0.10"),
        port_lo=32768,
        port_hi=33791,
        version=3,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", ("10.0.0.1", DEFAULT_PORT)),
        ("10.0.0.1:7000", ("10.0.0.1", 7000)),
        ("[::1]", ("::1", DEFAULT_PORT)),
        ("[::1]:7000", ("::1", 7000)),
        ("fd00::1", ("fd00::1", DEFAULT_PORT)),
        ("seed.example:1", ("seed.example", 1)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text, flag="--join") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.1:x", "--join must be HOST[:PORT], got '10.0.0.1:x'"),
        (":7946", "--join must be HOST[:PORT], got ':7946'"),
        ("[::1", "--join must be HOST[:PORT], got '[::1'"),
        ("10.0.0.1:70000", "--join port must be 0 to 65535, got 70000"),
    ],
)
def test_parse_address_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_address(text, flag="--join")
    assert str(caught.value) == message


def test_options_default_bind_and_advertise() -> None:
    options = gossip_options(bind=None, advertise="10.203.0.10", join=["10.203.0.11"])
    assert options.bind == ("0.0.0.0", DEFAULT_PORT)
    assert options.advertise == ("10.203.0.10", DEFAULT_PORT)
    assert options.seeds == ("10.203.0.11",)
    assert options.profile == "lan"
    # A specific bind address is advertised as it is.
    assert gossip_options(bind="10.0.0.2:8000", advertise=None).advertise == ("10.0.0.2", 8000)
    # A wildcard bind falls back to --address.
    fallback = gossip_options(bind=None, advertise=None, address="10.0.0.3")
    assert fallback.advertise == ("10.0.0.3", DEFAULT_PORT)


def test_an_ipv6_node_gossips_on_ipv6_by_default() -> None:
    # Before, the bind was 0.0.0.0 whatever the advertised address: an IPv6
    # cluster never formed, with nothing said but failed joins.
    for flags in ({"advertise": "[fd00:27::1]:7946"}, {"advertise": None, "address": "fd00::3"}):
        options = gossip_options(bind=None, **flags)
        assert options.bind == ("::", DEFAULT_PORT)
    assert gossip_options(bind=None, advertise="fd00::1").advertise == ("fd00::1", DEFAULT_PORT)
    with pytest.raises(ValueError, match="is IPv4 and --advertise fd00::1 IPv6"):
        gossip_options(bind="0.0.0.0:7946", advertise="[fd00::1]:7946")


def test_options_errors() -> None:
    with pytest.raises(ValueError, match="is a wildcard address"):
        gossip_options(bind="0.0.0.0:7946", advertise=None)
    with pytest.raises(ValueError, match="--bind must be an IP address"):
        gossip_options(bind="example.org", advertise="10.0.0.1")
    with pytest.raises(ValueError, match="--advertise must be an IP address"):
        gossip_options(bind=None, advertise="example.org")
    with pytest.raises(ValueError, match="--profile must be one of lan, wan, local"):
        gossip_options(bind=None, advertise="10.0.0.1", profile="fast")
    with pytest.raises(ValueError, match="--join must be HOST"):
        gossip_options(bind=None, advertise="10.0.0.1", join=["a:b:c:"])
    with pytest.raises(ValueError, match="node labels take"):
        gossip_options(bind=None, advertise="10.0.0.1", labels=(("k", "v" * 600),))


def _key(n: int = 32) -> str:
    return base64.b64encode(bytes(range(n))).decode()


def test_load_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2026-11\n{_key(32)}\n\n  {_key(16)}  \n")
    assert load_keys(path) == (bytes(range(32)), bytes(range(16)))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the file holds no key; make one with 'axnet keygen'"),
        ("# only a comment\n", "the file holds no key"),
        ("not base64!\n", "line 1: not a base64 key"),
        (f"{_key(32)}\n{_key(20)}\n", "line 2: a key must be 16, 24 or 32 bytes"),
    ],
)
def test_load_keys_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(ValueError) as caught:
        load_keys(path)
    assert str(caught.value).startswith(f"--gossip-key-file {path}")
    assert message in str(caught.value)


def test_load_keys_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read it: No such file or directory"):
        load_keys(tmp_path / "absent")


def test_record_keys_name_what_a_record_describes() -> None:
    assert record_key(service()) == b"s|10.1.0.5|80"
    assert record_key(service(version=9, deleted=True)) == record_key(service())
    assert record_key(service(port=81)) != record_key(service())
    assert record_key(app()) == b"a|app1"


def test_record_and_state_codecs_round_trip() -> None:
    records: list[AppRecord | ServiceRecord] = [
        service(),
        app(),
        service(port=81, deleted=True, deleted_at=5.0),
    ]
    assert record_from_wire(unpack(encode_record(records[0]))) == records[0]
    assert records_from_state(encode_state(records)).records == records
    assert records_from_state(b"").records == []
    for garbage in (
        b"\x81\xa1a\x01",  # a map, not a list
        b"\xc1",  # never valid msgpack
        b"\xdd\x7f\xff\xff\xff",  # promises 2^31 records
        encode_state(records)[:-3],  # cut short
        encode_state(records) + b"\x01",  # more after it
        pack([[[[[]] * 600] * 2]]),  # one record nested past any record's size
    ):
        with pytest.raises(WireError):
            records_from_state(garbage)


def test_a_state_of_junk_is_refused_early_and_a_few_bad_records_are_counted() -> None:
    # 2 M empty arrays (2 MB): refused after the first thousand, not decoded
    # to the end (which took 15 s for 20 MB, with the event loop blocked).
    junk = b"\xdd" + (2_000_000).to_bytes(4, "big") + b"\x90" * 2_000_000
    with pytest.raises(WireError, match="more than 1000 malformed records; first: a record"):
        records_from_state(junk)
    mixed = records_from_state(pack([record_to_wire(service()), [], "x" * 5000]))
    assert (mixed.records, mixed.dropped) == ([service()], 2)
    assert mixed.first_error == "a record must be a non-empty list"
    long_kind = records_from_state(pack([["k" * 5000]]))
    assert long_kind.dropped == 1 and len(long_kind.first_error) == 200  # one log line stays short
    # Trailing bytes, whole or cut short, refuse the state.
    for tail in (b"\x01", b"\x92", b"\xdb\x00\x00\xff\xff"):
        with pytest.raises(WireError, match="bytes after its records"):
            records_from_state(encode_state([service()]) + tail)


def test_a_record_fits_a_packet() -> None:
    # 1400-byte packets leave room for a service with a few labels.
    labelled = service(labels=tuple((f"key{i}", "v" * 20) for i in range(10)))
    assert len(encode_record(labelled)) < 600


def test_meta_round_trip_and_garbage() -> None:
    meta = encode_meta("10.203.0.10", (("zone", "a"),))
    assert decode_meta(meta) == ("10.203.0.10", {"zone": "a"})
    assert decode_meta(b"") == (None, {})
    assert decode_meta(b"\xc1") == (None, {})
    assert decode_meta(b"\x92\x01\x02") == (None, {})
    assert decode_meta(b"\x82\xa1a\x05\xa1l\x91\x01") == (None, {})


def test_a_peers_meta_reaches_axnet_members_only_as_a_daemon_would_send_it() -> None:
    # A peer's metadata is shown by `axnet members` on every node: escape
    # sequences and newlines there would reach the terminal (rich strips
    # neither ESC nor newlines), and the address would be anybody's text.
    hostile = msgpack.packb(
        {
            "a": "10.0.0.1\x1b[2J\nforged line",
            "l": [
                ["zone", "a"],
                ["k\x1b]0;title\x07", "v"],
                ["ok", "v\x1b[31m"],
                ["long", "v" * 256],
                ["x", 5],
                ["tier", "web"],
            ],
        },
        use_bin_type=True,
    )
    assert decode_meta(hostile) == (None, {"zone": "a", "tier": "web"})
    for address in ("not an address", "10.0.0.1 ", ""):
        assert decode_meta(encode_meta(address, ()))[0] is None
    assert decode_meta(encode_meta("fd00::5", ()))[0] == "fd00::5"


def test_a_key_file_others_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "key"
    path.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    path.chmod(0o644)
    gossip_options(bind=None, advertise="10.0.0.1", key_file=path)
    assert [r.getMessage() for r in caplog.records] == [
        f"gossip key file {path} is readable by other users (mode 644): whoever reads it "
        "can join the cluster and read its records; chmod 600 it"
    ]
    caplog.clear()
    path.chmod(0o600)
    gossip_options(bind=None, advertise="10.0.0.1", key_file=path)
    assert caplog.records == []


def test_unencrypted_gossip_off_loopback_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gossip_options(bind=None, advertise="10.0.0.1")
    assert [r.getMessage() for r in caplog.records] == [
        "gossip on 0.0.0.0:7946 is not encrypted: anyone who can reach it can join the "
        "cluster, read its records and publish services; give every node "
        "--gossip-key-file (see axnet keygen)"
    ]
    caplog.clear()
    gossip_options(bind="127.0.0.1:7946", advertise=None)  # one host's daemons only
    path = tmp_path / "key"
    path.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    path.chmod(0o600)
    gossip_options(bind=None, advertise="10.0.0.1", key_file=path)
    assert caplog.records == []
