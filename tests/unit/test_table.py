"""The replicated service table: last-writer-wins merge, tombstones, indexes."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from axnet._table import (
    MAX_RETIRED,
    TOMBSTONE_TTL,
    AppRecord,
    IPAddress,
    RealAddress,
    ServiceRecord,
    ServiceTable,
    VirtualAddress,
    endpoint,
    ip_address,
    labels_from,
    packed_ip,
)

HOST = ip_address("192.0.2.1")
OTHER_HOST = ip_address("192.0.2.2")
VIP = ip_address("10.77.0.5")
OTHER_VIP = ip_address("10.77.0.6")


def app(
    app_id: str = "a1",
    *,
    node: str = "n1",
    vip: IPAddress = VIP,
    real_host: IPAddress = HOST,
    block: tuple[int, int] = (40000, 40099),
    version: int = 1,
    deleted: bool = False,
    deleted_at: float = 0.0,
) -> AppRecord:
    return AppRecord(
        app_id=app_id,
        node=node,
        vip=vip,
        real_host=real_host,
        port_lo=block[0],
        port_hi=block[1],
        version=version,
        deleted=deleted,
        deleted_at=deleted_at,
    )


def service(
    vip: IPAddress = VIP,
    port: int = 80,
    *,
    real_port: int = 20000,
    real_host: IPAddress = HOST,
    node: str = "n1",
    app_id: str = "a1",
    version: int = 1,
    deleted: bool = False,
    deleted_at: float = 0.0,
) -> ServiceRecord:
    return ServiceRecord(
        virtual=VirtualAddress(ip=vip, port=port),
        real=RealAddress(host=real_host, port=real_port),
        node=node,
        app_id=app_id,
        version=version,
        deleted=deleted,
        deleted_at=deleted_at,
    )


# -- ip_address, labels, address text -----------------------------------------


def test_ip_address_unmaps_ipv4_mapped_ipv6() -> None:
    assert ip_address("::ffff:10.1.2.3") == ipaddress.IPv4Address("10.1.2.3")
    assert ip_address(ipaddress.IPv6Address("::ffff:10.1.2.3")) == ipaddress.IPv4Address("10.1.2.3")


def test_ip_address_refuses_a_scope() -> None:
    # Two spellings of one address would be two keys of the table, and the
    # scope's text is anything at all (control characters reached logs).
    for text in ("fd00::1%eth0", "2001:db8::7%\x1b[31m\nforged"):
        with pytest.raises(ValueError, match="is a scoped address"):
            ip_address(text)
    with pytest.raises(ValueError, match="is a scoped address"):
        ip_address(ipaddress.IPv6Address("fd00::1%1"))


def test_ip_address_keeps_plain_addresses() -> None:
    assert ip_address("10.1.2.3") == ipaddress.IPv4Address("10.1.2.3")
    assert ip_address("fd00::1") == ipaddress.IPv6Address("fd00::1")
    assert ip_address(ipaddress.IPv6Address("::1")) == ipaddress.IPv6Address("::1")


def test_ip_address_rejects_garbage_with_value_error() -> None:
    with pytest.raises(ValueError):
        ip_address("foo")


def test_labels_from_is_canonical_whatever_the_input_order() -> None:
    expected = (("a", "1"), ("b", "2"), ("c", "3"))
    assert labels_from({"c": "3", "a": "1", "b": "2"}) == expected
    assert labels_from([("b", "2"), ("c", "3"), ("a", "1")]) == expected
    assert labels_from({}) == ()


@given(st.dictionaries(st.text(max_size=5), st.text(max_size=5)), st.randoms())
def test_labels_from_equal_sets_compare_equal(labels: dict[str, str], rnd: random.Random) -> None:
    items = list(labels.items())
    shuffled = list(items)
    rnd.shuffle(shuffled)
    assert labels_from(items) == labels_from(shuffled) == labels_from(labels)


def test_address_text() -> None:
    assert str(VirtualAddress(ip=ip_address("10.0.0.1"), port=80)) == "10.0.0.1:80"
    assert str(VirtualAddress(ip=ip_address("fd00::1"), port=80)) == "[fd00::1]:80"
    assert str(RealAddress(host=ip_address("10.0.0.1"), port=8)) == "10.0.0.1:8"
    assert str(RealAddress(host=ip_address("::1"), port=8)) == "[::1]:8"


# -- merge: last writer wins ---------------------------------------------------


def test_merge_new_record_is_applied() -> None:
    table = ServiceTable()
    record = service()
    assert table.merge(record)
    assert table.resolve(VIP, 80) == record


def test_merge_higher_version_wins_lower_is_ignored() -> None:
    table = ServiceTable()
    v2 = service(version=2, real_port=20002)
    v1 = service(version=1, real_port=20001)
    assert table.merge(v2)
    assert not table.merge(v1)
    assert table.resolve(VIP, 80) == v2
    v3 = service(version=3, real_port=20003)
    assert table.merge(v3)
    assert table.resolve(VIP, 80) == v3


def test_merge_same_version_breaks_ties_by_node_name() -> None:
    table = ServiceTable()
    low = service(node="n1", version=5)
    high = service(node="n2", version=5, real_port=20009)
    assert table.merge(high)
    assert not table.merge(low)
    assert table.resolve(VIP, 80) == high


def test_a_withdrawn_service_keeps_its_name_for_its_real_address_until_another_takes_it() -> None:
    # Connections made to it name their peer after it (a server that closed
    # its listener serves them on); a live service there names it again.
    table = ServiceTable()
    real = RealAddress(host=HOST, port=20000)
    table.merge(service(version=1))
    assert table.retired_server(real) is None
    table.merge(service(version=2, deleted=True, deleted_at=100.0))
    assert table.virtual_of_server(real) is None
    assert table.retired_server(real) == VirtualAddress(ip=VIP, port=80)
    table.merge(service(OTHER_VIP, 81, version=3))
    assert table.virtual_of_server(real) == VirtualAddress(ip=OTHER_VIP, port=81)
    assert table.retired_server(real) is None
    # Moved to another real port: the old one keeps the name.
    table.merge(service(OTHER_VIP, 81, version=4, real_port=20001))
    assert table.retired_server(real) == VirtualAddress(ip=OTHER_VIP, port=81)
    # The newest MAX_RETIRED only.
    for port in range(MAX_RETIRED):
        table.merge(service(VIP, 1000 + port, version=5, real_port=21000 + port))
        table.merge(service(VIP, 1000 + port, version=6, real_port=21000 + port, deleted=True))
    assert len(table.retired_keys) == MAX_RETIRED
    assert table.retired_server(real) is None
    assert table.retired_server(RealAddress(host=HOST, port=21000)) == VirtualAddress(
        ip=VIP, port=1000
    )


def test_merge_same_record_twice_is_not_a_change() -> None:
    table = ServiceTable()
    assert table.merge(app())
    assert not table.merge(app())
    assert table.merge_all([app(), service()]) == [service()]


def test_tombstone_hides_service_and_its_reverse_index() -> None:
    table = ServiceTable()
    table.merge(service(version=1))
    assert table.virtual_of_server(RealAddress(host=HOST, port=20000)) == VirtualAddress(
        ip=VIP, port=80
    )
    tomb = service(version=2, deleted=True, deleted_at=100.0)
    assert table.merge(tomb)
    assert table.resolve(VIP, 80) is None
    assert table.virtual_of_server(RealAddress(host=HOST, port=20000)) is None
    assert table.live_services() == []
    assert list(table.records()) == [tomb]  # push-pull still sends the tombstone


def test_tombstone_blocks_an_older_live_record() -> None:
    table = ServiceTable()
    table.merge(app(version=5, deleted=True, deleted_at=10.0))
    assert not table.merge(app(version=4))
    assert not table.is_virtual_ip(VIP)
    assert table.live_apps() == []


def test_app_tombstone_drops_vip_and_block() -> None:
    table = ServiceTable()
    table.merge(app(version=1))
    assert table.is_virtual_ip(VIP)
    assert table.virtual_of_client(HOST, 40050) == VIP
    table.merge(app(version=2, deleted=True, deleted_at=1.0))
    assert not table.is_virtual_ip(VIP)
    assert table.virtual_of_client(HOST, 40050) is None


def test_a_withdrawn_apps_block_keeps_its_name_until_another_is_given_it() -> None:
    # Connections the app made name their peer after it (a server holds one
    # open, or accepts it only now), as natively the peer's address
    # outlives the peer; no live lookup (binds, own ports) sees it.
    table = ServiceTable()
    table.merge(app(version=1))
    assert table.retired_client(HOST, 40050) is None
    table.merge(app(version=2, deleted=True, deleted_at=1.0))
    assert table.virtual_of_client(HOST, 40050) is None
    assert table.retired_client(HOST, 40050) == VIP
    assert table.retired_client(HOST, 40100) is None
    assert table.retired_client(OTHER_HOST, 40050) is None
    # The native path's index: the block as block_keys packs it.
    assert table.retired_block_keys == {
        packed_ip(HOST): ((40000).to_bytes(2, "big") + (40099).to_bytes(2, "big") + packed_ip(VIP),)
    }
    # Given again: the newer holder's, live, then withdrawn.
    table.merge(app("a2", vip=OTHER_VIP, version=3))
    assert table.retired_client(HOST, 40050) is None
    assert table.virtual_of_client(HOST, 40050) == OTHER_VIP
    table.merge(app("a2", vip=OTHER_VIP, version=4, deleted=True, deleted_at=2.0))
    assert table.retired_client(HOST, 40050) == OTHER_VIP
    # An older holder's withdrawal, come late, leaves the newer name.
    table.merge(app("a0", version=0))
    table.merge(app("a0", version=1, deleted=True, deleted_at=3.0))
    assert table.retired_client(HOST, 40050) == OTHER_VIP
    assert len(table.retired_block_keys[packed_ip(HOST)]) == 1


def test_retired_blocks_are_the_newest_max_retired() -> None:
    table = ServiceTable()
    for i in range(MAX_RETIRED + 1):
        block = (1000 + 10 * i, 1009 + 10 * i)
        table.merge(app(f"a{i}", block=block, version=2 * i + 1))
        table.merge(app(f"a{i}", block=block, version=2 * i + 2, deleted=True))
    assert len(table.retired_block_keys[packed_ip(HOST)]) == MAX_RETIRED
    assert table.retired_client(HOST, 1000) is None
    assert table.retired_client(HOST, 1010) == VIP


def test_a_table_built_anew_keeps_the_retired_names() -> None:
    table = ServiceTable()
    table.merge_all([app(version=1), service(version=1)])
    table.merge_all([app(version=2, deleted=True), service(version=2, deleted=True)])
    fresh = ServiceTable()
    fresh.keep_retired(table)
    assert fresh.retired_client(HOST, 40050) == VIP
    assert fresh.retired_server(RealAddress(host=HOST, port=20000)) == VirtualAddress(
        ip=VIP, port=80
    )
    fresh.merge(app("a2", vip=OTHER_VIP, version=3))  # its block given again
    assert fresh.retired_client(HOST, 40050) is None
    assert table.retired_client(HOST, 40050) == VIP


def test_a_tombstone_leaves_another_app_with_the_same_block_and_vip() -> None:
    # A node restarted and gave a new app its old app's VIP and block; a peer
    # still holds the old app live when the new one arrives, then its tombstone.
    table = ServiceTable()
    table.merge(app("old", version=1))
    table.merge(app("new", version=5))
    table.merge(app("old", version=2, deleted=True, deleted_at=1.0))
    assert table.is_virtual_ip(VIP)
    assert table.virtual_of_client(HOST, 40050) == VIP
    assert len(table.block_keys[packed_ip(HOST)]) == 1


@pytest.mark.parametrize("newer_first", [False, True])
def test_a_block_given_again_names_its_newest_holder_before_the_old_ones_tombstone(
    newer_first: bool,
) -> None:
    # A node gave an app's block to the next app once it went: a peer may
    # hold both live (the tombstone is on its way), in either order.
    table = ServiceTable()
    old_vip, new_vip = ip_address("10.77.0.13"), ip_address("10.77.0.14")
    old, new = app("old", vip=old_vip, version=3), app("new", vip=new_vip, version=7)
    for record in (new, old) if newer_first else (old, new):
        table.merge(record)
    assert table.virtual_of_client(HOST, 40050) == new_vip
    # The packed index the native engine reads, newest first too.
    assert [k[4:] for k in table.block_keys[packed_ip(HOST)]] == [
        packed_ip(new_vip),
        packed_ip(old_vip),
    ]
    table.merge(app("old", vip=old_vip, version=4, deleted=True, deleted_at=1.0))
    assert table.virtual_of_client(HOST, 40050) == new_vip
    assert len(table.block_keys[packed_ip(HOST)]) == 1


def test_app_update_moves_vip_and_block() -> None:
    table = ServiceTable()
    new_vip = ip_address("10.77.0.6")
    table.merge(app(version=1))
    table.merge(app(version=2, vip=new_vip, block=(41000, 41099)))
    assert not table.is_virtual_ip(VIP)
    assert table.is_virtual_ip(new_vip)
    assert table.virtual_of_client(HOST, 40050) is None
    assert table.virtual_of_client(HOST, 41000) == new_vip


def test_service_update_moves_reverse_index() -> None:
    table = ServiceTable()
    table.merge(service(version=1, real_port=20000))
    table.merge(service(version=2, real_port=20001))
    assert table.virtual_of_server(RealAddress(host=HOST, port=20000)) is None
    assert table.virtual_of_server(RealAddress(host=HOST, port=20001)) == VirtualAddress(
        ip=VIP, port=80
    )


def test_vip_shared_by_two_apps_stays_virtual_until_both_are_gone() -> None:
    table = ServiceTable()
    table.merge(app("a1", block=(40000, 40099)))
    table.merge(app("a2", block=(40100, 40199)))
    table.merge(app("a1", version=2, block=(40000, 40099), deleted=True))
    assert table.is_virtual_ip(VIP)
    table.merge(app("a2", version=2, block=(40100, 40199), deleted=True))
    assert not table.is_virtual_ip(VIP)


def test_late_tombstone_of_old_service_keeps_reverse_index_of_new_service() -> None:
    # A node released 10.77.0.5:80 (real port 20000) and later gave 20000 to
    # 10.77.0.5:81.  Gossip is unordered: a peer may hear the new service
    # before the old service's tombstone.
    table = ServiceTable()
    table.merge(service(port=80, real_port=20000, version=1))
    table.merge(service(port=81, real_port=20000, version=3))
    table.merge(service(port=80, real_port=20000, version=2, deleted=True))
    assert table.virtual_of_server(RealAddress(host=HOST, port=20000)) == VirtualAddress(
        ip=VIP, port=81
    )


# -- expire ----------------------------------------------------------------


def test_expire_drops_only_tombstones_older_than_ttl() -> None:
    table = ServiceTable()
    table.merge(service(port=80, version=2, deleted=True, deleted_at=100.0))
    table.merge(service(port=81, real_port=20001, version=1))
    table.merge(app(version=2, deleted=True, deleted_at=130.0))
    assert table.expire(now=100.0 + TOMBSTONE_TTL) == 0  # exactly TTL old: kept
    assert table.expire(now=100.0 + TOMBSTONE_TTL + 1) == 1
    assert set(table.services) == {VirtualAddress(ip=VIP, port=81)}
    assert table.expire(now=130.0 + TOMBSTONE_TTL + 1) == 1
    assert table.apps == {}
    assert table.expire(now=1e9) == 0  # live records never expire


def test_expire_with_custom_ttl() -> None:
    table = ServiceTable()
    table.merge(service(version=2, deleted=True, deleted_at=10.0))
    assert table.expire(now=12.0, ttl=1.0) == 1
    assert table.services == {}


def test_after_expire_the_key_accepts_any_version_again() -> None:
    table = ServiceTable()
    table.merge(service(version=9, deleted=True, deleted_at=0.0))
    table.expire(now=TOMBSTONE_TTL + 1)
    assert table.merge(service(version=1))


# -- lookups -----------------------------------------------------------------


def test_resolve_unknown_is_none() -> None:
    table = ServiceTable()
    table.merge(service(port=80))
    assert table.resolve(VIP, 81) is None
    assert table.resolve(ip_address("10.77.0.9"), 80) is None


def test_is_virtual_ip_needs_an_app_record_not_a_service() -> None:
    table = ServiceTable()
    table.merge(service())
    assert not table.is_virtual_ip(VIP)
    table.merge(app())
    assert table.is_virtual_ip(VIP)
    assert not table.is_virtual_ip(HOST)


def test_virtual_of_client_picks_the_block_holding_the_port() -> None:
    table = ServiceTable()
    vip2 = ip_address("10.77.0.6")
    vip3 = ip_address("10.77.0.7")
    table.merge(app("a1", vip=VIP, block=(40000, 40099)))
    table.merge(app("a2", vip=vip2, block=(40100, 40199)))
    table.merge(app("a3", vip=vip3, real_host=OTHER_HOST, block=(40000, 40099)))
    assert table.virtual_of_client(HOST, 40000) == VIP
    assert table.virtual_of_client(HOST, 40099) == VIP
    assert table.virtual_of_client(HOST, 40100) == vip2
    assert table.virtual_of_client(HOST, 40199) == vip2
    assert table.virtual_of_client(HOST, 40200) is None
    assert table.virtual_of_client(HOST, 39999) is None
    assert table.virtual_of_client(OTHER_HOST, 40000) == vip3
    assert table.virtual_of_client(ip_address("192.0.2.99"), 40000) is None


def test_live_listings_are_sorted_and_skip_tombstones() -> None:
    table = ServiceTable()
    vip2 = ip_address("10.77.0.1")
    table.merge(service(port=443, real_port=20001))
    table.merge(service(port=80, real_port=20000))
    table.merge(service(vip=vip2, port=9, real_port=20002, version=2, deleted=True))
    table.merge(app("a1", vip=VIP, block=(40000, 40099)))
    table.merge(app("a2", vip=vip2, block=(40100, 40199)))
    assert [s.virtual.port for s in table.live_services()] == [80, 443]
    assert [a.vip for a in table.live_apps()] == [vip2, VIP]


def test_records_of_node_lists_live_records_of_that_node_only() -> None:
    table = ServiceTable()
    mine = service(port=80, node="n1")
    table.merge(mine)
    table.merge(service(port=81, real_port=20001, node="n2"))
    table.merge(service(port=82, real_port=20002, node="n1", deleted=True, version=2))
    ours = app(node="n1")
    table.merge(ours)
    assert table.records_of_node("n1") == [ours, mine]
    assert table.records_of_node("n3") == []


# -- hypothesis: LWW is commutative and idempotent --------------------------------

_VIPS = [ip_address(f"10.77.0.{i}") for i in range(1, 4)]
_HOSTS = [HOST, OTHER_HOST]
_NODES = ["n1", "n2"]


@st.composite
def _app_records(draw: st.DrawFn) -> AppRecord:
    index = draw(st.integers(0, 2))
    deleted = draw(st.booleans())
    # One block per app id, so two apps never hold an identical block.
    return app(
        f"app{index}",
        node=draw(st.sampled_from(_NODES)),
        vip=draw(st.sampled_from(_VIPS)),
        real_host=draw(st.sampled_from(_HOSTS)),
        block=(40000 + 100 * index, 40049 + 100 * index),
        version=draw(st.integers(0, 3)),
        deleted=deleted,
        deleted_at=draw(st.sampled_from([0.0, 5.0])) if deleted else 0.0,
    )


@st.composite
def _service_records(draw: st.DrawFn) -> ServiceRecord:
    port_index = draw(st.integers(0, 2))
    deleted = draw(st.booleans())
    # Real ports differ between virtual keys (see the xfail test above for
    # what happens when they do not).
    vip_index = draw(st.integers(0, len(_VIPS) - 1))
    real_port = 20000 + 100 * (vip_index * 3 + port_index) + draw(st.integers(0, 2))
    return service(
        _VIPS[vip_index],
        80 + port_index,
        real_port=real_port,
        real_host=draw(st.sampled_from(_HOSTS)),
        node=draw(st.sampled_from(_NODES)),
        app_id=draw(st.sampled_from(["x", "y"])),
        version=draw(st.integers(0, 3)),
        deleted=deleted,
        deleted_at=draw(st.sampled_from([0.0, 5.0])) if deleted else 0.0,
    )


def _unique_by_version_node(
    records: list[AppRecord | ServiceRecord],
) -> list[AppRecord | ServiceRecord]:
    # One writer never writes two different records with the same
    # (key, version, node); drop such pairs so the generated history is possible.
    seen: set[tuple[object, int, str]] = set()
    out: list[AppRecord | ServiceRecord] = []
    for record in records:
        ident = (record.key, record.version, record.node)
        if ident not in seen:
            seen.add(ident)
            out.append(record)
    return out


def _observable(table: ServiceTable) -> object:
    """Everything a reader can see, in a comparable form."""
    reals = {r.real for r in table.services.values()}
    return (
        dict(table.services),
        dict(table.apps),
        {vip: table.is_virtual_ip(vip) for vip in _VIPS},
        {real: table.virtual_of_server(real) for real in reals},
        {
            (host, port): table.virtual_of_client(host, port)
            for host in _HOSTS
            for port in range(40000, 40300, 25)
        },
        table.live_services(),
        # live_apps orders by vip only; apps sharing a vip may come in any order.
        [a.vip for a in table.live_apps()],
        frozenset(table.live_apps()),
    )


_RECORDS = st.lists(st.one_of(_app_records(), _service_records()), max_size=12).map(
    _unique_by_version_node
)


@given(_RECORDS, st.randoms(use_true_random=False))
def test_merge_order_does_not_matter(
    records: list[AppRecord | ServiceRecord], rnd: random.Random
) -> None:
    forward = ServiceTable()
    forward.merge_all(records)
    shuffled = list(records)
    rnd.shuffle(shuffled)
    other = ServiceTable()
    other.merge_all(shuffled)
    assert _observable(forward) == _observable(other)


@given(_RECORDS)
def test_merge_is_idempotent_and_keeps_the_greatest_version_node(
    records: list[AppRecord | ServiceRecord],
) -> None:
    table = ServiceTable()
    table.merge_all(records)
    before = _observable(table)
    assert table.merge_all(records) == []
    assert _observable(table) == before
    winners: dict[object, AppRecord | ServiceRecord] = {}
    for record in records:
        held = winners.get(record.key)
        if held is None or (record.version, record.node) > (held.version, held.node):
            winners[record.key] = record
    assert sorted(map(repr, table.records())) == sorted(map(repr, winners.values()))


# -- packed indexes (what the engine's native path reads) ------------------------


def test_endpoint_packs_v4_as_mapped_and_v6_as_is() -> None:
    assert endpoint(ip_address("10.1.0.5"), 80) == bytes(10) + b"\xff\xff" + bytes(
        [10, 1, 0, 5]
    ) + bytes([0, 80])
    v6 = ip_address("fd00::1")
    assert endpoint(v6, 0x1F90) == v6.packed + b"\x1f\x90"


def _unpacked_view(table: ServiceTable) -> object:
    """The packed indexes, answered the way the object lookups answer."""
    out: dict[object, object] = {}
    for record in table.services.values():
        vkey = endpoint(record.virtual.ip, record.virtual.port)
        rkey = endpoint(record.real.host, record.real.port)
        out["live", vkey] = table.live_keys.get(vkey)
        out["real", rkey] = table.real_keys.get(rkey)
    for host in _HOSTS:
        for port in range(40000, 40300, 25):
            vip = None
            for block in table.block_keys.get(packed_ip(host), ()):
                lo, hi = int.from_bytes(block[:2], "big"), int.from_bytes(block[2:4], "big")
                if lo <= port <= hi:
                    vip = block[4:]
                    break
            out["client", host, port] = vip
    return out


def _object_view(table: ServiceTable) -> object:
    out: dict[object, object] = {}
    for record in table.services.values():
        vkey = endpoint(record.virtual.ip, record.virtual.port)
        rkey = endpoint(record.real.host, record.real.port)
        live = table.resolve(record.virtual.ip, record.virtual.port)
        out["live", vkey] = None if live is None else endpoint(live.real.host, live.real.port)
        server = table.virtual_of_server(record.real)
        out["real", rkey] = None if server is None else endpoint(server.ip, server.port)
    for host in _HOSTS:
        for port in range(40000, 40300, 25):
            vip = table.virtual_of_client(host, port)
            out["client", host, port] = None if vip is None else packed_ip(vip)
    return out


@given(_RECORDS)
def test_packed_indexes_answer_as_the_object_lookups(
    records: list[AppRecord | ServiceRecord],
) -> None:
    table = ServiceTable()
    for record in records:
        table.merge(record)
        assert _unpacked_view(table) == _object_view(table)
    # Nothing is left behind for records that are gone.
    assert len(table.live_keys) == len(table._live)
    assert len(table.real_keys) == len(table._by_real)


def test_listings_mix_ipv4_and_ipv6() -> None:
    table = ServiceTable()
    v6 = ip_address("fd00::5")
    table.merge(app("a1"))
    table.merge(app("a2", vip=v6, block=(41000, 41099)))
    table.merge(service())
    table.merge(service(v6, 80, app_id="a2", real_port=20001))
    assert [a.vip for a in table.live_apps()] == [VIP, v6]
    assert [s.virtual.ip for s in table.live_services()] == [VIP, v6]


def test_forget_drops_the_very_record_held_and_leaves_no_trace() -> None:
    table = ServiceTable()
    web, client = service(), app("c1", vip=ip_address("10.77.0.9"))
    table.merge_all([web, client])
    assert not table.forget(service())  # an equal record, not the one held
    assert table.resolve(VIP, 80) is web
    assert table.forget(web) and table.forget(client)
    assert table.resolve(VIP, 80) is None
    assert table.virtual_of_server(web.real) is None
    assert table.virtual_of_client(HOST, 40000) is None
    assert not table.is_virtual_ip(client.vip)
    assert list(table.records()) == []
    assert not (table.live_keys or table.real_keys or table.block_keys)
    assert table.retired_client(HOST, 40000) is None
    assert table.merge(web)  # the same record later is taken again: no tombstone
    assert table.resolve(VIP, 80) is web


def test_forget_keeps_a_newer_record_under_the_key() -> None:
    table = ServiceTable()
    old = service()
    table.merge(old)
    newer = service(real_port=20001, version=2)
    table.merge(newer)
    assert not table.forget(old)
    assert table.resolve(VIP, 80) is newer
