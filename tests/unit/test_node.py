"""One node's apps, claims and records."""

from __future__ import annotations

import errno
import ipaddress
import itertools

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from axnet._leases import Binding, Lease
from axnet._node import (
    MAX_AHEAD_S,
    MAX_BLOCKS,
    ClaimError,
    Merged,
    Node,
    NodeConfig,
    PortRange,
    alias_id,
    alias_owner,
)
from axnet._table import (
    AppRecord,
    IPAddress,
    RealAddress,
    ServiceRecord,
    VirtualAddress,
    ip_address,
)
from axnet._views import app_view, service_view
from axnet._wire import record_to_wire, records_from_wire

HOST = ip_address("192.0.2.1")
NOW = 1_000.0


def make_node(
    *,
    name: str = "n1",
    listen: tuple[int, int] = (20000, 20009),
    client: tuple[int, int] = (40000, 40299),
    block: int = 100,
    virtual_range: str = "10.77.0.0/29",
    now: float = NOW,
) -> Node:
    config = NodeConfig(
        name=name,
        real_host=HOST,
        listen_ports=PortRange(lo=listen[0], hi=listen[1]),
        client_ports=PortRange(lo=client[0], hi=client[1]),
        client_block=block,
        virtual_range=ipaddress.ip_network(virtual_range),
    )
    return Node(config, now=now)


def attach(
    node: Node,
    app_id: str,
    *,
    vip: IPAddress | None = None,
    block: tuple[int, int] | None = None,
) -> AppRecord:
    app, written = node.attach(
        app_id=app_id,
        vip=vip,
        name=f"name-{app_id}",
        labels=(("tier", "web"),),
        pid=1234,
        argv=["prog", "arg"],
        block=block,
        now=NOW,
    )
    assert len(written) == 1
    record = written[0]
    assert isinstance(record, AppRecord)
    assert record.vip == app.vip
    return record


def va(ip: str, port: int) -> VirtualAddress:
    return VirtualAddress(ip=ip_address(ip), port=port)


# -- PortRange ------------------------------------------------------------------


def test_port_range_parse() -> None:
    assert PortRange.parse("20000-32767", flag="--listen-ports") == PortRange(lo=20000, hi=32767)
    assert len(PortRange.parse("5-5", flag="--x")) == 1


@pytest.mark.parametrize("text", ["", "20000", "a-b", "20000-", "-20000", "1-2-3"])
def test_port_range_parse_errors(text: str) -> None:
    with pytest.raises(ValueError) as info:
        PortRange.parse(text, flag="--listen-ports")
    assert str(info.value) == f"--listen-ports must look like 20000-32767, got {text!r}"


@pytest.mark.parametrize("text", ["30000-20000", "0-10", "1-65536"])
def test_port_range_parse_reversed_or_out_of_range(text: str) -> None:
    # It looks right: what is wrong is said instead.
    with pytest.raises(ValueError) as info:
        PortRange.parse(text, flag="--client-ports")
    assert str(info.value) == (
        f"--client-ports must run from a lower port to a higher within 1-65535, got {text!r}"
    )


@pytest.mark.parametrize(("lo", "hi"), [(0, 10), (10, 9), (1, 65536)])
def test_port_range_bounds(lo: int, hi: int) -> None:
    with pytest.raises(ValueError) as info:
        PortRange(lo=lo, hi=hi)
    assert str(info.value) == f"port range must be LO-HI within 1-65535, got {lo}-{hi}"


def test_node_config_defaults() -> None:
    config = NodeConfig(name="n", real_host=HOST)
    assert config.listen_ports == PortRange(lo=20000, hi=32767)
    assert config.client_ports == PortRange(lo=32768, hi=60999)
    assert config.client_block == 256
    assert config.virtual_range == ipaddress.ip_network("10.77.0.0/16")


# -- versions -----------------------------------------------------------------


def test_versions_start_from_now_in_microseconds_and_increase() -> None:
    node = make_node(now=NOW)
    first = attach(node, "a1")
    second = attach(node, "a2")
    assert first.version == int(NOW * 1_000_000) + 1
    assert second.version == first.version + 1


def test_restarted_node_writes_above_its_previous_life() -> None:
    old = make_node(now=NOW)
    old_records = [attach(old, f"a{i}") for i in range(3)]
    new = make_node(now=NOW + 1.0)
    assert attach(new, "a0").version > max(r.version for r in old_records)


# -- attach / detach ----------------------------------------------------------


def test_attach_picks_a_vip_from_the_virtual_range_and_a_block() -> None:
    node = make_node()
    record = attach(node, "a1")
    network = ipaddress.ip_network("10.77.0.0/29")
    assert record.vip in network
    assert record.vip not in (network.network_address, network.broadcast_address)
    assert (record.port_lo, record.port_hi) == (40000, 40099)
    assert record.node == "n1"
    assert record.real_host == HOST
    assert record.name == "name-a1"
    assert record.labels == (("tier", "web"),)
    assert not record.deleted
    assert node.table.is_virtual_ip(record.vip)
    assert node.table.virtual_of_client(HOST, 40050) == record.vip
    assert node.apps["a1"].argv == ("prog", "arg")


def test_attach_avoids_taken_vips_until_the_range_is_full() -> None:
    node = make_node(virtual_range="10.77.0.0/29")  # 6 usable addresses
    vips = {attach(node, f"a{i}").vip for i in range(6)}
    assert len(vips) == 6
    assert vips == set(ipaddress.ip_network("10.77.0.0/29").hosts())
    with pytest.raises(ClaimError) as info:
        node.attach(app_id="a7", vip=None, name="", labels=(), pid=1, argv=(), block=None, now=NOW)
    assert info.value.errno == errno.EADDRNOTAVAIL
    assert str(info.value) == "virtual range 10.77.0.0/29 is full"


def test_attach_avoids_vips_of_other_nodes() -> None:
    node = make_node(virtual_range="10.77.0.0/30")  # .1 and .2
    other = make_node(name="n2", virtual_range="10.77.0.0/30")
    node.merge_remote([attach(other, "b1")], now=NOW)
    mine = attach(node, "a1")
    assert mine.vip != other.apps["b1"].vip


def test_attach_vip_freed_by_detach_can_be_reused() -> None:
    node = make_node(virtual_range="10.77.0.0/30")
    first = attach(node, "a1")
    attach(node, "a2")
    node.detach("a1", now=NOW)
    assert attach(node, "a3").vip == first.vip


def test_attach_explicit_vip_and_adopted_block() -> None:
    node = make_node()
    record = attach(node, "a1", vip=ip_address("10.1.0.5"), block=(40200, 40299))
    assert record.vip == ip_address("10.1.0.5")
    assert (record.port_lo, record.port_hi) == (40200, 40299)
    assert (attach(node, "a2").port_lo, node.apps["a2"].block) == (40000, (40000, 40099))


def test_attach_wanted_block_in_use_gets_another() -> None:
    node = make_node()
    attach(node, "a1")
    assert node.apps["a1"].block == (40000, 40099)
    attach(node, "a2", block=(40000, 40099))
    assert node.apps["a2"].block == (40100, 40199)


def test_a_wanted_block_that_overlaps_one_in_use_or_leaves_the_range_gets_another() -> None:
    # A supervisor from before a restart with another --client-block asks for
    # its old block: a source port must still name exactly one app.
    node = make_node(client=(40000, 40499), block=100)
    attach(node, "old", block=(40050, 40149))
    attach(node, "a2", block=(40000, 40099))
    assert node.apps["a2"].block == (40200, 40299)  # the first grid block clear of it
    attach(node, "a3", block=(50000, 50099))  # outside --client-ports
    assert node.apps["a3"].block == (40300, 40399)
    blocks = sorted(a.block for a in node.apps.values() if a.block)
    assert all(hi < lo for (_, hi), (lo, _) in itertools.pairwise(blocks))


def test_the_top_of_the_client_ports_is_in_no_block() -> None:
    # Connections of an app with no free port in a block of its own leave
    # from the spill ports: servers name them after the node, never after
    # another app.  So no block is cut from them, nor given back into them.
    config = NodeConfig(name="n", real_host=HOST)
    assert config.spill_ports == PortRange(lo=59236, hi=60999)  # a sixteenth of 28 232
    assert config.block_ports == PortRange(lo=32768, hi=59235)
    node = make_node(client=(40000, 41599), block=100, virtual_range="10.77.0.0/24")
    assert node.config.spill_ports == PortRange(lo=41500, hi=41599)  # 16 blocks' worth, 1 kept
    taken = [attach(node, f"a{i}") and node.apps[f"a{i}"].block for i in range(16)]
    assert taken[:15] == [(lo, lo + 99) for lo in range(40000, 41500, 100)]
    assert taken[15] is None  # none left outside the spill ports
    attach(node, "back", block=(41500, 41599))  # a lease from before the spill ports
    assert node.apps["back"].block is None


def test_too_few_client_ports_keep_no_spill() -> None:
    # Fewer than four spills' worth: every port goes to blocks, and a
    # connection past them takes any port, as before the spill ports.
    config = NodeConfig(
        name="n", real_host=HOST, client_ports=PortRange(lo=40000, hi=40299), client_block=100
    )
    assert config.spill_ports is None
    assert config.block_ports == config.client_ports


def test_client_blocks_are_disjoint_and_last_is_clamped() -> None:
    node = make_node(client=(40000, 40249), block=100)
    attach(node, "a1")
    attach(node, "a2")
    attach(node, "a3")
    assert [node.apps[a].block for a in ("a1", "a2", "a3")] == [
        (40000, 40099),
        (40100, 40199),
        (40200, 40249),
    ]


def test_no_block_left_the_app_still_attaches() -> None:
    node = make_node(client=(40000, 40099), block=100)
    attach(node, "a1")
    record = attach(node, "a2")
    assert node.apps["a2"].block is None
    assert (record.port_lo, record.port_hi) == (0, 0)
    assert node.table.is_virtual_ip(record.vip)


def test_detach_frees_the_block() -> None:
    node = make_node(client=(40000, 40099), block=100)
    attach(node, "a1")
    node.detach("a1", now=NOW)
    attach(node, "a2")
    assert node.apps["a2"].block == (40000, 40099)


def test_a_block_given_back_goes_to_another_app_only_after_every_other() -> None:
    node = make_node(client=(40000, 40299), block=100)
    attach(node, "a1")
    node.detach("a1", now=NOW)
    taken = []
    for name in ("a2", "a3", "a4"):
        attach(node, name)
        taken.append(node.apps[name].block)
    assert taken == [(40100, 40199), (40200, 40299), (40000, 40099)]


def test_an_app_that_used_up_its_block_gets_more_up_to_the_limit() -> None:
    node = make_node(client=(40000, 41099), block=100)  # 10 blocks, and 100 spill ports
    attach(node, "a1")
    attach(node, "a2")
    granted = []
    for _ in range(MAX_BLOCKS - 1):
        block, written = node.more_ports("a1")
        assert block is not None
        granted.append(block)
        # Each published as an alias record: nodes of any version name
        # connections from it after the app.
        [alias] = written
        assert isinstance(alias, AppRecord)
        assert alias.app_id == alias_id("a1", len(granted))
        assert (alias.port_lo, alias.port_hi) == block
        assert alias.vip == node.apps["a1"].vip
        assert node.table.virtual_of_client(HOST, block[0]) == alias.vip
    assert granted == [(40000 + 100 * i, 40099 + 100 * i) for i in range(2, MAX_BLOCKS + 1)]
    assert node.more_ports("a1") == (None, [])  # MAX_BLOCKS held
    # Gone with the app: the blocks are free again, the aliases withdrawn.
    written = node.detach("a1", now=NOW)
    withdrawn = {r.app_id for r in written if isinstance(r, AppRecord) and r.deleted}
    assert withdrawn == {"a1", *(alias_id("a1", i) for i in range(1, MAX_BLOCKS))}
    assert node.table.virtual_of_client(HOST, 40250) is None
    assert node.more_ports("a2")[0] == (40900, 40999)  # the one never given first
    assert node.more_ports("a2")[0] == (40000, 40099)  # then, round again, a1's


def test_an_app_re_attaching_gets_back_every_block_it_held_that_is_free() -> None:
    # After a daemon restart an app's connections from all its blocks are
    # still open: each block it held is its own again (published by its
    # alias record, so servers keep naming those connections by its vip),
    # unless another app took it meanwhile; never past MAX_BLOCKS.
    node = make_node(client=(40000, 40999), block=100)
    attach(node, "other", block=(40300, 40399))
    app, written = node.attach(
        app_id="a1",
        vip=ip_address("10.1.0.9"),
        name="",
        labels=(),
        pid=1,
        argv=[],
        block=(40500, 40599),
        more_blocks=[(40000, 40099), (40300, 40399), (40100, 40199)],
        now=NOW,
    )
    assert app.block == (40500, 40599)
    assert app.more_blocks == [(40000, 40099), (40100, 40199)]  # not other's
    assert [(r.app_id, r.port_lo) for r in written if isinstance(r, AppRecord)] == [
        ("a1", 40500),
        (alias_id("a1", 1), 40000),
        (alias_id("a1", 2), 40100),
    ]
    for port in (40000, 40150, 40550):
        assert node.table.virtual_of_client(HOST, port) == ip_address("10.1.0.9")
    # Held again, they go to nobody else.
    assert attach(node, "a2").port_lo == 40200
    assert len(node.apps["a1"].blocks) == 3
    many = [(40000 + 100 * i, 40099 + 100 * i) for i in range(10)]
    crowded = make_node(client=(40000, 40999), block=100)
    app, _ = crowded.attach(
        app_id="a1",
        vip=None,
        name="",
        labels=(),
        pid=1,
        argv=[],
        block=many[0],
        more_blocks=many[1:],
        now=NOW,
    )
    assert len(app.blocks) == MAX_BLOCKS


def test_what_a_previous_daemon_s_apps_hold_goes_to_no_newcomer_until_they_re_attach() -> None:
    # A daemon restarted: the app that held vip .2, blocks 40000-40199 and
    # .2:80 (real port 20000) has not re-attached yet.  A newcomer gets
    # none of it (EADDRINUSE for .2:80, as the kernel would say: the app
    # still holds that socket); the app, re-attaching, gets all of it back.
    node = make_node(client=(40000, 40499), block=100)
    held = Lease(
        app_id="old",
        pid=77,
        started=5,
        vip=ip_address("10.77.0.2"),
        blocks=((40000, 40099), (40100, 40199)),
        bindings=(Binding(virtual=va("10.77.0.2", 80), real_port=20000),),
    )
    node.reserve([held])
    assert node.leases() == [held]  # a second restart keeps holding it
    newcomer = attach(node, "new")
    assert newcomer.vip != held.vip
    assert (newcomer.port_lo, newcomer.port_hi) == (40200, 40299)
    assert node.claim("new", va(str(newcomer.vip), 0)).real_port == 20001  # not old's 20000
    node.attach(
        app_id="twin",
        vip=ip_address("10.77.0.2"),
        name="",
        labels=(),
        pid=2,
        argv=[],
        block=None,
        now=NOW,
    )
    with pytest.raises(ClaimError) as in_use:
        node.claim("twin", va("10.77.0.2", 80))
    assert in_use.value.errno == errno.EADDRINUSE
    assert node.claim("twin", va("10.77.0.2", 81)).real_port == 20002
    app, _ = node.attach(
        app_id="old",
        vip=held.vip,
        name="",
        labels=(),
        pid=77,
        argv=[],
        block=(40000, 40099),
        more_blocks=[(40100, 40199)],
        now=NOW,
        started=5,
    )
    assert app.blocks == [(40000, 40099), (40100, 40199)]
    assert node.adopt("old", va("10.77.0.2", 80), real_port=20000, listening=True)
    assert {lease.app_id for lease in node.leases()} == {"new", "twin", "old"}
    [old] = [lease for lease in node.leases() if lease.app_id == "old"]
    assert old == held


def test_holding_ends_when_the_table_settles() -> None:
    node = make_node(client=(40000, 40199), block=100)
    node.reserve(
        [
            Lease(
                app_id="gone",
                pid=9,
                started=1,
                vip=ip_address("10.77.0.2"),
                blocks=((40000, 40099),),
            )
        ]
    )
    assert attach(node, "a1").port_lo == 40100
    assert node.end_reservations(now=NOW) == (["gone"], [])
    assert node.leases()[0].app_id == "a1"
    assert attach(node, "a2").port_lo == 40000
    # An app already attached is never held for (its own daemon's lease).
    node.reserve([Lease(app_id="a1", pid=9, started=1, vip=ip_address("10.77.0.6"))])
    assert node.end_reservations(now=NOW) == ([], [])


def test_more_ports_when_none_is_left() -> None:
    node = make_node(client=(40000, 40199), block=100)
    attach(node, "a1")
    attach(node, "a2")
    assert node.more_ports("a1") == (None, [])
    attach(node, "a3")  # none left: attached without a block
    node.detach("a2", now=NOW)
    # The first block of an app that had none is its own record's.
    block, [record] = node.more_ports("a3")
    assert block == (40100, 40199)
    assert isinstance(record, AppRecord) and record.app_id == "a3"
    assert (record.port_lo, record.port_hi) == block
    with pytest.raises(ClaimError) as info:
        node.more_ports("gone")
    assert info.value.errno == errno.ENOENT


def test_app_ids_never_look_like_those_of_block_records() -> None:
    node = make_node()
    with pytest.raises(ClaimError) as info:
        attach(node, "a1+1")
    assert info.value.errno == errno.EINVAL
    assert alias_owner(alias_id("a1", 3)) == ("a1", 3)
    assert alias_owner("a1") is None
    assert alias_owner("a1+x") is None


def test_a_peers_record_whose_id_ends_in_another_kind_of_digit_is_no_block_record() -> None:
    # "²" passes str.isdigit() but not int(): a record of ours under such an
    # id, from a peer, once raised out of merge_remote and ended the daemon.
    node = make_node(name="n1")
    mine = attach(node, "a1")
    assert isinstance(mine, AppRecord)
    for app_id in ("a1+\u00b2", "a1+\u0661"):  # superscript two, Arabic-Indic one
        assert alias_owner(app_id) is None
        theirs = attrs.evolve(mine, app_id=app_id, version=mine.version + 1)
        [withdrawn] = node.merge_remote([theirs], now=NOW).reasserted
        assert withdrawn.deleted and withdrawn.app_id == app_id
    assert node.table.apps["a1"] == mine


# What a peer may send: names and ids near ours and our block records,
# addresses of every kind, versions around ours and at the wire's limits.
_peer_nodes = st.sampled_from(["n1", "n2"])
_peer_ids = st.one_of(
    st.sampled_from(["a1", "a1+1", "a1+2", "a1+\u00b2", "a1+\u0661", "+1", "a1+"]),
    st.text(max_size=8),
)
_peer_ips = st.sampled_from(["10.77.0.1", "10.77.0.2", "192.0.2.1", "fd00::1", "127.0.0.1"])
_peer_ports = st.integers(0, 65535)
# (Versions past a day ahead of NOW, and times that are not finite, never
# get past the decoder and the horizon: a few are enough.)
_peer_versions = st.one_of(st.integers(0, 2 * 10**9), st.just(2**63 - 1))
_peer_times = st.floats(allow_nan=False, allow_infinity=False)
_peer_labels = st.lists(st.lists(st.text(max_size=4), min_size=2, max_size=2), max_size=2)
_peer_records = st.one_of(
    st.tuples(
        st.just("a"),
        _peer_ids,
        _peer_nodes,
        _peer_ips,
        _peer_ips,
        _peer_ports,
        _peer_ports,
        st.text(max_size=4),
        _peer_labels,
        _peer_versions,
        st.booleans(),
        _peer_times,
    ),
    st.tuples(
        st.just("s"),
        _peer_ips,
        _peer_ports,
        _peer_ips,
        _peer_ports,
        _peer_nodes,
        _peer_ids,
        st.text(max_size=4),
        _peer_labels,
        _peer_versions,
        st.booleans(),
        _peer_times,
    ),
).map(list)


@given(st.lists(_peer_records, max_size=6))
def test_whatever_a_peer_sends_that_decodes_merges_without_raising(items: list[object]) -> None:
    # An exception out of merge_remote ends the daemon's gossip, and with it
    # the daemon: any record that decodes must merge, and show.
    node = make_node(name="n1")
    mine = attach(node, "a1")
    node.claim("a1", va(str(mine.vip), 80))
    node.listen("a1", va(str(mine.vip), 80))
    node.more_ports("a1")
    merged = node.merge_remote(records_from_wire(items).records, now=NOW)
    for record in merged.accepted + merged.reasserted:
        record_to_wire(record)
    for service in node.table.live_services():
        service_view(service)
    for app in node.table.live_apps():
        alias_owner(app.app_id)
        app_view(app, node.apps.get(app.app_id))
    node.forget_node("n2", now=NOW)
    node.republish()


def test_a_peers_newer_copy_of_a_block_record_is_answered_with_ours() -> None:
    node = make_node(client=(40000, 40999), block=100)
    attach(node, "a1")
    _, [alias] = node.more_ports("a1")
    assert isinstance(alias, AppRecord)
    tomb = attrs.evolve(alias, version=alias.version + 10, deleted=True, deleted_at=NOW)
    merged = node.merge_remote([tomb], now=NOW)
    [again] = merged.reasserted
    assert isinstance(again, AppRecord)
    assert again.app_id == alias.app_id and not again.deleted
    assert again.version > tomb.version
    # One of a block it no longer holds is withdrawn again.
    stale = attrs.evolve(alias, app_id=alias_id("a1", 5), version=again.version + 1)
    [withdrawn] = node.merge_remote([stale], now=NOW).reasserted
    assert withdrawn.deleted


def test_attach_twice_is_eexist() -> None:
    node = make_node()
    attach(node, "a1")
    with pytest.raises(ClaimError) as info:
        attach(node, "a1")
    assert info.value.errno == errno.EEXIST
    assert str(info.value) == "app a1 is already attached"


def test_detach_unknown_app_writes_nothing() -> None:
    assert make_node().detach("nope", now=NOW) == []


def test_detach_tombstones_services_then_the_app_with_higher_versions() -> None:
    node = make_node()
    app = attach(node, "a1")
    node.claim("a1", VirtualAddress(ip=app.vip, port=80))
    node.claim("a1", VirtualAddress(ip=app.vip, port=81))  # bound, never listened
    (published,) = node.listen("a1", VirtualAddress(ip=app.vip, port=80))
    written = node.detach("a1", now=NOW + 5)
    assert [type(r) for r in written] == [ServiceRecord, AppRecord]
    tomb_service, tomb_app = written
    assert tomb_service.deleted and tomb_app.deleted
    assert tomb_service.deleted_at == tomb_app.deleted_at == NOW + 5
    assert tomb_service.key == published.key
    assert tomb_service.version > published.version
    assert tomb_app.version > tomb_service.version > app.version
    assert node.table.resolve(app.vip, 80) is None
    assert not node.table.is_virtual_ip(app.vip)
    assert "a1" not in node.apps


# -- claims -----------------------------------------------------------------


def test_claim_gives_real_ports_from_the_pool_in_turn() -> None:
    node = make_node()
    vip = attach(node, "a1").vip
    first = node.claim("a1", VirtualAddress(ip=vip, port=80))
    second = node.claim("a1", VirtualAddress(ip=vip, port=81))
    assert (first.real_port, second.real_port) == (20000, 20001)
    assert first.virtual == VirtualAddress(ip=vip, port=80)
    assert first.app_id == "a1"
    assert not first.listening


def test_apps_sharing_a_virtual_ip_share_its_ports_as_on_one_host() -> None:
    node = make_node()
    attach(node, "a1", vip=ip_address("10.1.0.5"))
    attach(node, "a2", vip=ip_address("10.1.0.5"))
    node.claim("a1", va("10.1.0.5", 80))
    with pytest.raises(ClaimError) as info:
        node.claim("a2", va("10.1.0.5", 80))
    assert info.value.errno == errno.EADDRINUSE
    assert str(info.value) == "10.1.0.5:80 is already in use"
    node.claim("a2", va("10.1.0.5", 81))


def _adoption_waiting() -> Node:
    """a2 listens on 10.1.0.5:80; a1 re-attaches with its own listener there,
    which waits (EADDRINUSE)."""
    node = make_node()
    attach(node, "a2", vip=ip_address("10.1.0.5"))
    node.claim("a2", va("10.1.0.5", 80))
    node.listen("a2", va("10.1.0.5", 80))
    attach(node, "a1", vip=ip_address("10.1.0.5"))
    with pytest.raises(ClaimError) as info:
        node.adopt("a1", va("10.1.0.5", 80), real_port=20005, listening=True)
    assert info.value.errno == errno.EADDRINUSE
    return node


def test_an_adopted_binding_another_app_took_is_published_once_that_one_goes() -> None:
    # After a daemon restart, a2 claims 10.1.0.5:80 before a1's supervisor
    # re-attaches and hands over its listener there.  a1 still holds the
    # socket: once a2 lets go, a1's service is published, not lost.
    node = _adoption_waiting()
    written = node.detach("a2", now=NOW)
    live = [r for r in written if isinstance(r, ServiceRecord) and not r.deleted]
    assert [(r.app_id, r.real.port) for r in live] == [("a1", 20005)]
    assert [s.app_id for s in node.table.live_services()] == ["a1"]
    # Released by a1 in turn, it is withdrawn as any other.
    node.release("a1", va("10.1.0.5", 80), now=NOW)
    assert node.table.live_services() == []


def test_a_waiting_adoption_ends_with_its_app() -> None:
    node = _adoption_waiting()
    node.detach("a1", now=NOW)
    node.release("a2", va("10.1.0.5", 80), now=NOW)
    assert node.table.live_services() == []


def test_claim_twice_is_eaddrinuse() -> None:
    node = make_node()
    attach(node, "a1", vip=ip_address("10.1.0.5"))
    node.claim("a1", va("10.1.0.5", 80))
    with pytest.raises(ClaimError) as info:
        node.claim("a1", va("10.1.0.5", 80))
    assert info.value.errno == errno.EADDRINUSE
    assert str(info.value) == "10.1.0.5:80 is already in use"


def test_an_app_claims_only_its_own_virtual_ip() -> None:
    # Any other address (loopback, a real host, a neighbour's VIP) would
    # redirect every app's connects to it.
    node = make_node()
    attach(node, "a1", vip=ip_address("10.1.0.5"))
    for ip in ("127.0.0.1", "192.0.2.1", "10.1.0.6"):
        with pytest.raises(ClaimError) as info:
            node.claim("a1", va(ip, 5432))
        assert info.value.errno == errno.EADDRNOTAVAIL
        assert str(info.value) == f"{ip} is not app a1's virtual IP 10.1.0.5"
    assert node.table.resolve(ip_address("127.0.0.1"), 5432) is None


def test_claim_of_a_remote_service_is_eaddrinuse() -> None:
    node = make_node()
    other = make_node(name="n2")
    b = attach(other, "b1", vip=ip_address("10.1.0.5"))
    other.claim("b1", VirtualAddress(ip=b.vip, port=80))
    node.merge_remote(other.listen("b1", VirtualAddress(ip=b.vip, port=80)), now=NOW)
    attach(node, "a1", vip=ip_address("10.1.0.5"))
    with pytest.raises(ClaimError) as info:
        node.claim("a1", va("10.1.0.5", 80))
    assert info.value.errno == errno.EADDRINUSE


def test_claim_port_zero_uses_the_real_port_as_virtual() -> None:
    node = make_node()
    vip = attach(node, "a1").vip
    claim = node.claim("a1", VirtualAddress(ip=vip, port=0))
    assert claim.real_port == 20000
    assert claim.virtual == VirtualAddress(ip=vip, port=20000)
    assert node.apps["a1"].claims == {claim.virtual: claim}


def test_claim_port_zero_whose_real_port_is_taken_virtually_is_eaddrinuse() -> None:
    node = make_node(listen=(20000, 20001))
    vip = attach(node, "a1").vip
    node.claim("a1", VirtualAddress(ip=vip, port=20001))  # real port 20000
    with pytest.raises(ClaimError) as info:
        node.claim("a1", VirtualAddress(ip=vip, port=0))  # real 20001, virtual 20001: taken
    assert info.value.errno == errno.EADDRINUSE
    assert str(info.value) == f"{vip}:20001 is already in use"
    # The real port went back to the pool.
    assert node.claim("a1", VirtualAddress(ip=vip, port=81)).real_port == 20001


def test_claim_pool_exhaustion_is_eaddrnotavail() -> None:
    node = make_node(listen=(20000, 20001))
    vip = attach(node, "a1").vip
    node.claim("a1", VirtualAddress(ip=vip, port=1))
    node.claim("a1", VirtualAddress(ip=vip, port=2))
    with pytest.raises(ClaimError) as info:
        node.claim("a1", VirtualAddress(ip=vip, port=3))
    assert info.value.errno == errno.EADDRNOTAVAIL
    assert str(info.value) == (
        "listener port pool 20000-20001 of node n1 is exhausted; "
        "give the daemon a wider --listen-ports"
    )


def test_claim_released_port_returns_to_the_pool() -> None:
    node = make_node(listen=(20000, 20000))
    vip = attach(node, "a1").vip
    node.claim("a1", VirtualAddress(ip=vip, port=1))
    node.release("a1", VirtualAddress(ip=vip, port=1), now=NOW)
    assert node.claim("a1", VirtualAddress(ip=vip, port=1)).real_port == 20000


def test_claim_avoids_ports_the_supervisor_could_not_bind() -> None:
    node = make_node(listen=(20000, 20002))
    vip = attach(node, "a1").vip
    claim = node.claim("a1", VirtualAddress(ip=vip, port=80), avoid=[20000, 20001])
    assert claim.real_port == 20002
    with pytest.raises(ClaimError) as info:
        node.claim("a1", VirtualAddress(ip=vip, port=81), avoid=[20000, 20001])
    assert info.value.errno == errno.EADDRNOTAVAIL


def test_claim_skips_ports_held_outside_axnet_and_says_so_when_none_is_left() -> None:
    # Another user's daemon walks the same pool: its apps hold 20000-20002.
    node = make_node(listen=(20000, 20004))
    vip = attach(node, "a1").vip
    outside = {20000, 20001, 20002, 20004}
    asked: list[int] = []

    def taken(port: int) -> bool:
        asked.append(port)
        return port in outside

    claim = node.claim("a1", VirtualAddress(ip=vip, port=80), taken=taken)
    assert (claim.real_port, asked) == (20003, [20000, 20001, 20002, 20003])
    with pytest.raises(ClaimError) as info:
        node.claim("a1", VirtualAddress(ip=vip, port=81), taken=taken)
    assert info.value.errno == errno.EADDRNOTAVAIL
    assert "(4 of them held by other programs, or by connections still open)" in str(info.value)
    # A port adopted after a restart is the app's own: not asked about.
    asked.clear()
    node.claim("a1", VirtualAddress(ip=vip, port=82), real_port=20001, taken=taken)
    assert asked == []


def test_claim_of_another_apps_real_port_is_refused() -> None:
    # A supervisor re-attaching names the real ports it holds; one naming
    # another app's (a bug, or hostile) made both claims share it, and the
    # first release gave the port back to the pool under the other's socket.
    node = make_node(listen=(20000, 20001))
    x, y = attach(node, "x").vip, attach(node, "y").vip
    assert node.claim("x", VirtualAddress(ip=x, port=80)).real_port == 20000
    with pytest.raises(ClaimError) as info:
        node.claim("y", VirtualAddress(ip=y, port=81), real_port=20000)
    assert info.value.errno == errno.EADDRNOTAVAIL
    assert str(info.value) == "real port 20000 is held by app x"
    assert node.claim("y", VirtualAddress(ip=y, port=82)).real_port == 20001


def test_claim_adopts_a_real_port_and_keeps_it_out_of_the_pool() -> None:
    node = make_node(listen=(20000, 20001))
    vip = attach(node, "a1").vip
    adopted = node.claim("a1", VirtualAddress(ip=vip, port=80), real_port=20000)
    assert adopted.real_port == 20000
    assert node.claim("a1", VirtualAddress(ip=vip, port=81)).real_port == 20001


def test_claim_for_an_unknown_app_is_enoent() -> None:
    with pytest.raises(ClaimError) as info:
        make_node().claim("ghost", va("10.1.0.5", 80))
    assert info.value.errno == errno.ENOENT
    assert str(info.value) == "no app ghost is attached to this node"


# -- listen / release -----------------------------------------------------------


def test_listen_publishes_a_service_record() -> None:
    node = make_node()
    app = attach(node, "a1", vip=ip_address("10.1.0.5"))
    virtual = va("10.1.0.5", 80)
    claim = node.claim("a1", virtual)
    (record,) = node.listen("a1", virtual)
    assert record == ServiceRecord(
        virtual=virtual,
        real=RealAddress(host=HOST, port=claim.real_port),
        node="n1",
        app_id="a1",
        name="name-a1",
        labels=(("tier", "web"),),
        version=app.version + 1,
    )
    assert claim.listening
    assert node.table.resolve(virtual.ip, 80) == record
    assert node.table.virtual_of_server(record.real) == virtual
    assert node.listen("a1", virtual) == []  # a second listen changes nothing


def test_listen_without_a_claim_is_einval() -> None:
    node = make_node()
    attach(node, "a1")
    with pytest.raises(ClaimError) as info:
        node.listen("a1", va("10.1.0.5", 80))
    assert info.value.errno == errno.EINVAL
    assert str(info.value) == "10.1.0.5:80 was never claimed by app a1"


def test_release_tombstones_with_a_higher_version() -> None:
    node = make_node()
    attach(node, "a1", vip=ip_address("10.1.0.5"))
    virtual = va("10.1.0.5", 80)
    node.claim("a1", virtual)
    (live,) = node.listen("a1", virtual)
    (tomb,) = node.release("a1", virtual, now=NOW + 3)
    assert isinstance(tomb, ServiceRecord)
    assert tomb.deleted
    assert tomb.deleted_at == NOW + 3
    assert tomb.version > live.version
    assert tomb.key == live.key
    assert node.table.resolve(virtual.ip, 80) is None
    assert node.release("a1", virtual, now=NOW) == []  # already gone


def test_release_of_a_claim_never_listened_writes_nothing_but_frees_it() -> None:
    node = make_node()
    attach(node, "a1", vip=ip_address("10.1.0.5"))
    virtual = va("10.1.0.5", 80)
    node.claim("a1", virtual)
    assert node.release("a1", virtual, now=NOW) == []
    node.claim("a1", virtual)  # free again


# -- records from elsewhere --------------------------------------------------------


def _remote_service(node: str, *, version: int = 1, port: int = 80) -> ServiceRecord:
    return ServiceRecord(
        virtual=va("10.9.0.1", port),
        real=RealAddress(host=ip_address("192.0.2.9"), port=20000 + port),
        node=node,
        app_id="b1",
        version=version,
    )


def test_merge_remote_never_takes_records_of_our_own_node_as_they_are() -> None:
    node = make_node(name="n1")
    mine = attach(node, "a1")
    older = attrs.evolve(mine, version=mine.version - 1, deleted=True)
    merged = node.merge_remote([older, mine], now=NOW)
    assert merged == Merged(accepted=[], reasserted=[])
    assert node.table.apps["a1"] == mine


def test_merge_remote_reasserts_a_live_app_a_peer_tombstoned_above_us() -> None:
    node = make_node(name="n1")
    mine = attach(node, "a1")
    tomb = attrs.evolve(mine, version=mine.version + 100, deleted=True, deleted_at=NOW)
    merged = node.merge_remote([tomb], now=NOW + 1)
    assert merged.accepted == []
    (fresh,) = merged.reasserted
    assert isinstance(fresh, AppRecord)
    assert not fresh.deleted
    assert fresh.version > tomb.version
    assert attrs.evolve(fresh, version=mine.version) == mine
    assert node.table.apps["a1"] == fresh
    assert node.table.is_virtual_ip(mine.vip)


def test_merge_remote_reasserts_a_live_service_a_peer_tombstoned_above_us() -> None:
    node = make_node(name="n1")
    attach(node, "a1", vip=ip_address("10.1.0.5"))
    node.claim("a1", va("10.1.0.5", 80))
    (live,) = node.listen("a1", va("10.1.0.5", 80))
    tomb = attrs.evolve(live, version=live.version + 1, deleted=True, deleted_at=NOW)
    (fresh,) = node.merge_remote([tomb], now=NOW).reasserted
    assert isinstance(fresh, ServiceRecord)
    assert not fresh.deleted and fresh.version > tomb.version
    assert node.table.resolve(ip_address("10.1.0.5"), 80) == fresh
    # Later writes stay above what the peer held too.
    assert attach(node, "a2").version > fresh.version


def test_merge_remote_tombstones_a_live_record_of_a_previous_life() -> None:
    node = make_node(name="n1", now=NOW)
    ghost = _remote_service("n1", version=int((NOW + 50) * 1_000_000))
    merged = node.merge_remote([ghost], now=NOW + 2)
    (tomb,) = merged.reasserted
    assert tomb.key == ghost.key
    assert tomb.deleted and tomb.deleted_at == NOW + 2
    assert tomb.version > ghost.version
    assert node.table.resolve(ghost.virtual.ip, ghost.virtual.port) is None


def _previous_life(node: str = "n1") -> list[AppRecord | ServiceRecord]:
    """What app "old" published under a previous daemon of *node*: its app
    record, the alias of its second block, and listeners at .2:80 and .2:81."""
    version = int((NOW - 10) * 1_000_000)
    app = AppRecord(
        app_id="old",
        node=node,
        vip=ip_address("10.77.0.2"),
        real_host=HOST,
        port_lo=40000,
        port_hi=40099,
        version=version,
    )
    alias = attrs.evolve(app, app_id=alias_id("old", 1), port_lo=40100, port_hi=40199)
    services = [
        ServiceRecord(
            virtual=va("10.77.0.2", port),
            real=RealAddress(host=HOST, port=real),
            node=node,
            app_id="old",
            version=version + i,
        )
        for i, (port, real) in enumerate([(80, 20000), (81, 20001)], start=1)
    ]
    return [app, alias, *services]


def _old_lease() -> Lease:
    return Lease(
        app_id="old",
        pid=77,
        started=5,
        vip=ip_address("10.77.0.2"),
        blocks=((40000, 40099), (40100, 40199)),
        bindings=(
            Binding(virtual=va("10.77.0.2", 80), real_port=20000),
            Binding(virtual=va("10.77.0.2", 81), real_port=20001),
        ),
    )


def test_merge_remote_keeps_records_of_an_app_held_for_as_they_are() -> None:
    # A restarted daemon holds for "old" (its lease: its process runs on).
    # A peer's push-pull, or its broadcast, shows the daemon what "old"
    # published before: kept as it is, neither withdrawn (clients elsewhere
    # would be refused until "old" re-attaches) nor written again.  A record
    # of an app held for by no lease is withdrawn, as ever.
    node = make_node(client=(40000, 40499), block=100)
    node.reserve([_old_lease()])
    before = _previous_life()
    stranger = _remote_service("n1", version=before[0].version)
    merged = node.merge_remote([*before, stranger], now=NOW)
    assert merged.accepted == before
    (tomb,) = merged.reasserted
    assert tomb.key == stranger.key and tomb.deleted
    assert node.table.resolve(ip_address("10.77.0.2"), 80) == before[2]
    assert node.table.resolve(ip_address("10.77.0.2"), 81) == before[3]
    assert node.table.apps["old"] == before[0]
    assert node.table.virtual_of_client(HOST, 40150) == ip_address("10.77.0.2")
    assert node.merge_remote(before, now=NOW) == Merged(accepted=[], reasserted=[])
    # "old" re-attaches with its first block only, and hands back .2:80 (its
    # own, not another's: no EADDRINUSE): what it did not take back, .2:81
    # and the alias of its second block, goes then, and only that.
    _, (again,) = node.attach(
        app_id="old",
        vip=ip_address("10.77.0.2"),
        name="",
        labels=(),
        pid=77,
        argv=[],
        block=(40000, 40099),
        now=NOW,
        started=5,
    )
    assert again.version > before[0].version and not again.deleted
    (live,) = node.adopt("old", va("10.77.0.2", 80), real_port=20000, listening=True)
    assert live.version > before[2].version and not live.deleted
    withdrawn = node.end_hold("old", now=NOW + 1)
    assert sorted(str(r.key) for r in withdrawn) == ["10.77.0.2:81", alias_id("old", 1)]
    assert all(r.deleted and r.deleted_at == NOW + 1 for r in withdrawn)
    assert node.table.resolve(ip_address("10.77.0.2"), 80) == live
    assert node.table.resolve(ip_address("10.77.0.2"), 81) is None
    assert not node.table.apps["old"].deleted
    assert node.end_hold("old", now=NOW + 2) == []
    assert node.end_reservations(now=NOW + 2) == ([], [])


def test_records_held_for_an_app_that_never_re_attaches_go_when_the_table_settles() -> None:
    # Its process died during the restart, or its supervisor never came
    # back: the holding ends when the table settles, and so do its records.
    node = make_node(client=(40000, 40499), block=100)
    node.reserve([_old_lease()])
    before = _previous_life()
    node.merge_remote(before, now=NOW)
    ended, withdrawn = node.end_reservations(now=NOW + 5)
    assert ended == ["old"]
    assert sorted(str(r.key) for r in withdrawn) == sorted(str(r.key) for r in before)
    assert all(r.deleted and r.version > before[-1].version for r in withdrawn)
    assert node.table.live_services() == [] and node.table.live_apps() == []
    # Shown again later, they are withdrawn at once, as for any app not held for.
    live = attrs.evolve(before[2], version=withdrawn[-1].version + 10)
    (tomb,) = node.merge_remote([live], now=NOW + 6).reasserted
    assert tomb.deleted and node.table.resolve(ip_address("10.77.0.2"), 80) is None


def test_merge_remote_takes_a_tombstone_of_ours_we_no_longer_own() -> None:
    node = make_node(name="n1")
    tomb = attrs.evolve(_remote_service("n1", version=5), deleted=True, deleted_at=NOW)
    assert node.merge_remote([tomb], now=NOW) == Merged(accepted=[], reasserted=[])
    assert node.table.services[tomb.virtual] == tomb


def test_merge_remote_returns_what_changed() -> None:
    node = make_node(name="n1")
    newer = _remote_service("n2", version=2)
    older = _remote_service("n2", version=1)
    merged = node.merge_remote([newer, older, newer], now=NOW)
    assert merged == Merged(accepted=[newer], reasserted=[])
    assert node.table.resolve(ip_address("10.9.0.1"), 80) == newer


def test_merge_remote_refuses_records_dated_far_ahead_of_our_clock() -> None:
    # Versions are microseconds of wall-clock time: one from further ahead
    # than any skew could never be superseded by its owner's next write.
    node = make_node(name="n1")
    mine = attach(node, "a1")
    ahead = int((NOW + MAX_AHEAD_S + 1) * 1_000_000)
    pinned = _remote_service("n2", version=ahead)
    ours = attrs.evolve(mine, version=2**63 - 1, deleted=True, deleted_at=NOW)
    late_tomb = attrs.evolve(_remote_service("n2", version=3), deleted=True, deleted_at=NOW * 1e6)
    merged = node.merge_remote([pinned, ours, late_tomb], now=NOW)
    assert merged == Merged(accepted=[], reasserted=[], refused=[pinned, ours, late_tomb])
    assert node.table.services == {}
    assert node.table.apps["a1"] == mine
    # Our next write is still an ordinary one, which every peer accepts.
    assert attach(node, "a2").version < int((NOW + MAX_AHEAD_S) * 1_000_000)
    # Skew within the bound is merged as before.
    skewed = _remote_service("n2", version=int((NOW + 3600) * 1_000_000))
    assert node.merge_remote([skewed], now=NOW).accepted == [skewed]


def test_forget_node_tombstones_its_live_records_locally() -> None:
    node = make_node(name="n1")
    attach(node, "a1")
    other = make_node(name="n2")
    b = attach(other, "b1", vip=ip_address("10.9.0.1"))
    other.claim("b1", VirtualAddress(ip=b.vip, port=80))
    written_by_other = [b, *other.listen("b1", VirtualAddress(ip=b.vip, port=80))]
    node.merge_remote(written_by_other, now=NOW)
    forgotten = node.forget_node("n2", now=NOW + 7)
    tombs = forgotten.accepted
    assert len(tombs) == 2 and forgotten.reasserted == []
    for tomb, original in zip(tombs, written_by_other, strict=True):
        assert tomb.key == original.key
        assert tomb.deleted
        assert tomb.deleted_at == NOW + 7
        assert tomb.version == original.version + 1
        assert tomb.node == "n2"
    assert not node.table.is_virtual_ip(b.vip)
    assert node.table.resolve(b.vip, 80) is None
    assert node.table.records_of_node("n1") != []  # our own records untouched
    assert node.forget_node("n2", now=NOW + 8) == Merged(accepted=[], reasserted=[])


def test_forget_node_spares_what_a_successor_serves_from_its_own_host() -> None:
    # n2's host restarted at a new address and took the name back before its
    # old self was found dead: that death withdraws the old life's records,
    # not the ones the new life already published (before, all of them).
    node = make_node(name="n1")
    old = attrs.evolve(
        _remote_service("n2", version=3), real=RealAddress(host=ip_address("192.0.2.3"), port=20000)
    )
    new = attrs.evolve(
        _remote_service("n2", version=5),
        virtual=VirtualAddress(ip=ip_address("10.9.0.2"), port=80),
        real=RealAddress(host=ip_address("192.0.2.4"), port=20000),
    )
    node.merge_remote([old, new], now=NOW)
    forgotten = node.forget_node("n2", now=NOW + 7, spare_host=ip_address("192.0.2.4"))
    assert [tomb.key for tomb in forgotten.accepted] == [old.key]
    assert node.table.records_of_node("n2") == [new]


def test_forget_node_is_overridden_when_the_node_republishes() -> None:
    node = make_node(name="n1")
    other = make_node(name="n2")
    b = attach(other, "b1", vip=ip_address("10.9.0.1"))
    node.merge_remote([b], now=NOW)
    node.forget_node("n2", now=NOW)
    attach(other, "b2")  # n2 wrote on during the partition: its versions moved on
    node.merge_remote(other.republish(), now=NOW)
    assert node.table.is_virtual_ip(b.vip)


def test_a_false_death_converges_when_the_owner_writes_the_same_next_version() -> None:
    node = make_node(name="n1")
    other = make_node(name="n2")
    b = attach(other, "b1", vip=ip_address("10.9.0.1"))
    node.merge_remote([b], now=NOW)
    tombs = node.forget_node("n2", now=NOW).accepted  # n2 was only partitioned away
    republished = other.republish()  # n2 rejoins; same version as the tombstone
    assert [r.version for r in republished] == [t.version for t in tombs]
    node.merge_remote(republished, now=NOW)
    # Push-pull in both directions, until nothing changes.
    for _ in range(3):
        back = other.merge_remote(node.table.records(), now=NOW).reasserted
        node.merge_remote(back, now=NOW)
    assert node.table.apps["b1"] == other.table.apps["b1"]
    assert node.table.is_virtual_ip(b.vip)


def test_republish_writes_fresh_versions_of_live_records() -> None:
    node = make_node()
    app = attach(node, "a1", vip=ip_address("10.1.0.5"))
    node.claim("a1", va("10.1.0.5", 80))
    node.claim("a1", va("10.1.0.5", 81))  # not listening: not published
    (service,) = node.listen("a1", va("10.1.0.5", 80))
    written = node.republish()
    assert [type(r) for r in written] == [AppRecord, ServiceRecord]
    fresh_app, fresh_service = written
    assert fresh_app.version > service.version > app.version
    assert fresh_service.version > fresh_app.version
    assert fresh_app.key == app.key and fresh_service.key == service.key
    assert not fresh_app.deleted and not fresh_service.deleted
    assert node.table.apps["a1"] == fresh_app


def test_republish_of_an_empty_node_writes_nothing() -> None:
    assert make_node().republish() == []


@pytest.mark.parametrize("vip", ["127.0.0.1", "::1", "224.0.0.1", "192.0.2.1"])
def test_attach_refuses_a_vip_an_app_cannot_own(vip: str) -> None:
    node = make_node()
    with pytest.raises(ClaimError) as info:
        attach(node, "a1", vip=ip_address(vip))
    assert info.value.errno == errno.EINVAL
    assert "cannot be a virtual IP" in str(info.value)
    assert "a1" not in node.apps


def test_a_restarted_node_starts_picking_virtual_ips_elsewhere() -> None:
    # Apps that survived a daemon restart re-attach with their VIPs a moment
    # later; a fresh app meanwhile should not take the first one again.
    before = [attach(make_node(virtual_range="10.77.0.0/16", now=1000.0), "a").vip]
    after = [attach(make_node(virtual_range="10.77.0.0/16", now=2000.0), "a").vip]
    assert before != after


def test_picked_virtual_ips_never_include_the_nodes_own_address() -> None:
    node = make_node(virtual_range="192.0.2.0/29")  # HOST, 192.0.2.1, is in it
    vips = {attach(node, f"a{i}").vip for i in range(5)}
    assert HOST not in vips and len(vips) == 5


def _serve(node: Node, app_id: str, ip: str, port: int = 80) -> list[AppRecord | ServiceRecord]:
    """*app_id* attached to *node* at *ip*, listening on *port*: what that wrote."""
    _, written = node.attach(
        app_id=app_id,
        vip=ip_address(ip),
        name="",
        labels=(),
        pid=1,
        argv=["x"],
        block=None,
        now=NOW,
    )
    node.claim(app_id, va(ip, port))
    return [*written, *node.listen(app_id, va(ip, port))]


def _live(node: Node, ip: str, port: int = 80) -> str | None:
    """The node serving ip:port in *node*'s table."""
    record = node.table.resolve(ip_address(ip), port)
    return record.node if record is not None else None


def test_a_service_that_moved_here_from_a_node_started_later_is_published() -> None:
    # Versions start at each daemon's start: n2's are above n1's.  n2's
    # tombstone of the service must not outrank n1's record of it.
    n1, n2 = make_node(name="n1", now=NOW), make_node(name="n2", now=NOW + 100)
    served = _serve(n2, "b1", "10.1.0.5")
    gone = n2.detach("b1", now=NOW + 101)
    n1.merge_remote([*served, *gone], now=NOW + 102)
    written = _serve(n1, "a1", "10.1.0.5")
    assert _live(n1, "10.1.0.5") == "n1"
    n2.merge_remote(written, now=NOW + 103)
    assert _live(n2, "10.1.0.5") == "n1"


def test_a_late_tombstone_of_another_node_does_not_withdraw_what_we_serve() -> None:
    # Its withdrawal reaches us only after our app took the address over.
    n1, n2 = make_node(name="n1", now=NOW), make_node(name="n2", now=NOW + 100)
    served = _serve(n2, "b1", "10.1.0.5")
    gone = n2.detach("b1", now=NOW + 101)
    _serve(n1, "a1", "10.1.0.5")
    merged = n1.merge_remote([*served, *gone], now=NOW + 102)
    assert _live(n1, "10.1.0.5") == "n1"
    [ours] = [r for r in merged.reasserted if isinstance(r, ServiceRecord)]
    n2.merge_remote([ours], now=NOW + 103)
    assert _live(n2, "10.1.0.5") == "n1"


def test_of_two_nodes_serving_one_address_the_survivor_takes_over() -> None:
    # Both bound at once (neither knew of the other): last-writer-wins picks
    # n2 everywhere, without a war of versions; once n2's app goes, n1's,
    # still listening, is published again.
    n1, n2 = make_node(name="n1", now=NOW), make_node(name="n2", now=NOW + 100)
    mine, theirs = _serve(n1, "a1", "10.1.0.5"), _serve(n2, "b1", "10.1.0.5")
    assert n1.merge_remote(theirs, now=NOW + 101).reasserted == []
    assert n2.merge_remote(mine, now=NOW + 101).reasserted == []
    assert _live(n1, "10.1.0.5") == _live(n2, "10.1.0.5") == "n2"
    merged = n1.merge_remote(n2.detach("b1", now=NOW + 102), now=NOW + 102)
    assert _live(n1, "10.1.0.5") == "n1"
    n2.merge_remote(merged.reasserted, now=NOW + 103)
    assert _live(n2, "10.1.0.5") == "n1"


def test_our_tombstone_does_not_withdraw_the_service_of_a_node_that_won() -> None:
    n1, n2 = make_node(name="n1", now=NOW), make_node(name="n2", now=NOW + 100)
    _serve(n1, "a1", "10.1.0.5")
    n1.merge_remote(_serve(n2, "b1", "10.1.0.5"), now=NOW + 101)
    n1.detach("a1", now=NOW + 102)
    assert _live(n1, "10.1.0.5") == "n2"


def test_of_two_nodes_serving_one_address_the_survivor_takes_over_from_a_dead_one() -> None:
    # The winner's host died: its records are withdrawn where they are
    # forgotten, not by its own tombstones.
    n1, n2 = make_node(name="n1", now=NOW), make_node(name="n2", now=NOW + 100)
    _serve(n1, "a1", "10.1.0.5")
    n1.merge_remote(_serve(n2, "b1", "10.1.0.5"), now=NOW + 101)
    assert _live(n1, "10.1.0.5") == "n2"
    forgotten = n1.forget_node("n2", now=NOW + 102)
    assert _live(n1, "10.1.0.5") == "n1"
    [ours] = [r for r in forgotten.reasserted if isinstance(r, ServiceRecord)]
    assert ours.node == "n1" and not ours.deleted
    n3 = make_node(name="n3", now=NOW + 200)  # another member that forgot n2 too
    n3.merge_remote([*n2.table.records()], now=NOW + 201)
    n3.forget_node("n2", now=NOW + 202)
    n3.merge_remote(forgotten.reasserted, now=NOW + 203)
    assert _live(n3, "10.1.0.5") == "n1"
