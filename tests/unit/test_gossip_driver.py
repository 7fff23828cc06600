"""The gossip driver in one process: real daemons' nodes, real sockets on loopback."""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import msgpack
import pytest
import trio

import swim
from axnet import _gossip as gossip_module
from axnet._daemon import Daemon, DaemonConfig, Record
from axnet._gossip import ORPHAN_GRACE_S, GossipCluster
from axnet._gossip_backlog import MAX_PENDING_STATES, MERGE_CHUNK
from axnet._gossip_codec import encode_state
from axnet._gossip_options import gossip_options
from axnet._gossip_transport import (
    MAX_INBOUND_PER_SOURCE,
    MAX_INBOUND_STREAMS,
    MEMBER_RESERVED_STREAMS,
)
from axnet._node import NodeConfig
from axnet._table import TOMBSTONE_TTL, AppRecord, ServiceRecord, VirtualAddress
from axnet._wire import pack, records_from_state

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def make_daemon(name: str) -> Daemon:
    node = NodeConfig(name=name, real_host=ipaddress.ip_address("127.0.0.1"))
    return Daemon(DaemonConfig(node=node, runtime_dir=Path("/nonexistent")))


@asynccontextmanager
async def running(
    name: str,
    *,
    key: bytes | None = KEY,
    bind: str = "127.0.0.1:0",
    advertise: str | None = None,
    seeds: tuple[str, ...] = (),
) -> AsyncIterator[GossipCluster]:
    daemon = make_daemon(name)
    options = gossip_options(bind=bind, advertise=advertise, profile="local")
    options = type(options)(
        bind=options.bind,
        advertise=options.advertise,
        seeds=seeds,
        keys=(key,) if key is not None else (),
        profile="local",
    )
    cluster = GossipCluster(daemon, options)
    await cluster.bind()
    daemon.cluster = cluster
    async with trio.open_nursery() as nursery:
        await nursery.start(cluster.run)
        yield cluster
        nursery.cancel_scope.cancel()


async def eventually(
    what: str,
    predicate: Callable[[], object],
    timeout: float = 10,
    shown: Callable[[], object] = lambda: None,
) -> None:
    """Until *predicate* holds; else fail, with what *shown* gives (the state
    that fell short, for a failure in CI to explain itself)."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"{what}: not true after {timeout} s: {shown()!r}")


async def merge_state(cluster: GossipCluster, records: list[list[object]]) -> None:
    """Hand *records* to the cluster as a peer's push-pull state, and wait for the merge."""
    cluster.merge_remote_state(pack(records), join=False)
    await cluster._backlog.wait_merged()


def seed(cluster: GossipCluster) -> str:
    host, port = cluster.address
    return f"{host}:{port}"


def statuses(cluster: GossipCluster) -> dict[str, str]:
    return {m["name"]: m["status"] for m in cluster.members()}


def attach(daemon: Daemon, app_id: str, vip: str | None = None) -> tuple[AppRecord, list[Record]]:
    """An app attached to *daemon*'s node: its record, and what the node wrote."""
    _, written = daemon.node.attach(
        app_id=app_id,
        vip=ipaddress.ip_address(vip) if vip else None,
        name="",
        labels=(),
        pid=1,
        argv=[app_id],
        block=None,
        now=trio.current_time(),
    )
    [record] = written
    assert isinstance(record, AppRecord)
    return record, list(written)


async def publish_service(cluster: GossipCluster, daemon: Daemon, port: int) -> VirtualAddress:
    app, written = attach(daemon, f"app{port}", "10.1.0.5")
    claim = daemon.node.claim(app.app_id, VirtualAddress(ip=app.vip, port=port))
    written += daemon.node.listen(app.app_id, claim.virtual)
    await daemon.changed(written)
    return claim.virtual


async def test_a_member_has_the_same_keys_with_gossip_as_without() -> None:
    # `axnet members --json` of a daemon without gossip lacked "incarnation":
    # a script had to guess which keys it would find.
    async with running("a") as a:
        [member] = a.members()
        assert member.keys() == a._daemon._self_member().keys()


async def test_join_replicate_leave() -> None:
    async with running("a") as a, running("b") as b, running("c") as c:
        assert await b.join([seed(a)]) == 1
        assert await c.join([seed(a)]) == 1
        everyone = {"a": "alive", "b": "alive", "c": "alive"}
        await eventually(
            "members agree",
            lambda: all(statuses(x) == everyone for x in (a, b, c)),
            shown=lambda: {x.core.name: statuses(x) for x in (a, b, c)},
        )
        assert a.members()[1]["address"] == "127.0.0.1"

        virtual = await publish_service(a, a._daemon, 80)
        await eventually(
            "service replicated",
            lambda: all(x._daemon.node.table.resolve(virtual.ip, 80) for x in (b, c)),
        )
        await c.leave()
        await eventually("c left", lambda: statuses(a).get("c") == "left")
        stats = a.stats()
        assert stats["members"] == {"alive": 2, "suspect": 0, "dead": 0, "left": 1}
        assert stats["encrypted"] is True


async def test_a_restarted_member_withdraws_what_its_previous_life_published() -> None:
    async with running("a") as a:
        async with running("b") as b:
            assert await b.join([seed(a)]) == 1
            virtual = await publish_service(b, b._daemon, 81)
            await eventually("replicated", lambda: a._daemon.node.table.resolve(virtual.ip, 81))
        # b crashed (no leave); a new life of b joins without the app.
        async with running("b") as b2:
            assert await b2.join([seed(a)]) == 1
            await eventually(
                "stale service withdrawn",
                lambda: a._daemon.node.table.resolve(virtual.ip, 81) is None,
            )


async def test_wrong_key_is_refused_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="axnet.gossip")
    async with running("a") as a, running("x", key=OTHER_KEY) as x:
        assert await x.join([seed(a)]) == 0
        assert statuses(a) == {"a": "alive"}
        assert a.stats()["streams"]["dropped_auth"] == 1
        assert "gossip refused stream from=127.0.0.1:" in caplog.text
        # Datagrams too; warnings about one source address are rate-limited
        # (the stream refused above already warned about 127.0.0.1).
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(5):
            await sock.sendto(b"\x81" + os.urandom(60), a.address)
        await eventually("counted", lambda: a.stats()["drops"]["auth"] == 5)
        assert caplog.text.count("gossip refused") == 1
        sock.close()


async def test_bad_datagrams_and_stalled_streams_are_counted() -> None:
    async with running("a", key=None) as a:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.sendto(b"\x01\xc1", a.address)  # malformed
        await sock.sendto(b"\x01" + bytes(2000), a.address)  # oversized
        stalled = trio.socket.socket()
        await stalled.connect(a.address)
        await stalled.send(struct.pack("!I", 1000) + b"\x01")
        huge = trio.socket.socket()
        await huge.connect(a.address)
        await huge.send(struct.pack("!I", 2**31))
        await eventually(
            "counted",
            lambda: (
                a.stats()["drops"]["malformed"] == 1
                and a.stats()["drops"]["oversized"] == 1
                and a.stats()["streams"]["oversized"] == 1
                and a.stats()["streams"]["timed_out"] == 1
            ),  # local: tcp_timeout 1 s
        )
        for s in (sock, stalled, huge):
            s.close()


async def test_one_address_cannot_take_every_inbound_stream() -> None:
    # Streams that never send their frame hold a slot for tcp_timeout each.
    # From one address, only MAX_INBOUND_PER_SOURCE of them: a member
    # elsewhere still gets its join through.
    async with running("a") as a, running("b") as b:
        stalls = []
        for _ in range(MAX_INBOUND_STREAMS):
            sock = trio.socket.socket()
            await sock.bind(("127.0.0.2", 0))
            await sock.connect(a.address)
            stalls.append(sock)
        refused = MAX_INBOUND_STREAMS - MAX_INBOUND_PER_SOURCE
        await eventually("refused", lambda: a.stats()["streams"]["busy"] == refused)
        assert await b.join([seed(a)]) == 1
        for sock in stalls:
            sock.close()


async def test_hosts_that_are_no_member_leave_slots_for_members() -> None:
    # Hosts that are no member, each holding the most one address may, take
    # only the unreserved slots: the last of them is refused, and a member
    # still gets its push-pull through.
    async with running("a") as a, running("b") as b:
        assert await b.join([seed(a)]) == 1  # b, at 127.0.0.1, is a member now
        unreserved = MAX_INBOUND_STREAMS - MEMBER_RESERVED_STREAMS
        stalls = []
        for i in range(unreserved // MAX_INBOUND_PER_SOURCE + 1):
            for _ in range(MAX_INBOUND_PER_SOURCE):
                sock = trio.socket.socket()
                await sock.bind((f"127.0.0.{2 + i}", 0))
                await sock.connect(a.address)
                stalls.append(sock)
        await eventually(
            "the last host refused",
            lambda: a.stats()["streams"]["busy"] == MAX_INBOUND_PER_SOURCE,
        )
        assert await b.join([seed(a)]) == 1
        for sock in stalls:
            sock.close()


@pytest.mark.parametrize("host", ["..", "a" * 64 + ".example", "bad\x00host", "\udcff"])
async def test_an_address_a_peer_made_up_is_not_sent_to(host: str) -> None:
    # A PingReq asks us to ping target_address: a name that cannot be encoded,
    # or one that needs a DNS lookup, is dropped; the driver keeps serving.
    async with running("a", key=None) as a, running("b", key=None) as b:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        body = msgpack.packb(
            [[2, 1, "x", host, 7946, "attacker", False]], unicode_errors="surrogatepass"
        )
        await sock.sendto(b"\x01" + body, a.address)
        sock.close()
        await trio.sleep(0.2)  # the relayed ping is attempted (and dropped) meanwhile
        assert await a.join([seed(b)]) == 1
        await eventually("both alive", lambda: statuses(a) == {"a": "alive", "b": "alive"})


async def test_what_a_member_publishes_after_leaving_waits_for_its_rejoin() -> None:
    async with running("a") as a, running("b") as b:
        assert await b.join([seed(a)]) == 1
        await eventually("joined", lambda: statuses(a) == {"a": "alive", "b": "alive"})
        await b.leave()
        await eventually("b left", lambda: statuses(a).get("b") == "left")
        virtual = await publish_service(b, b._daemon, 81)
        # Gossiped now, it would outlive b in a's table: a already took b's leave.
        await trio.sleep(0.5)  # many gossip rounds of the local profile
        assert a._daemon.node.table.resolve(virtual.ip, 81) is None
        assert await b.join([seed(a)]) == 1
        await eventually(
            "replicated after the rejoin", lambda: a._daemon.node.table.resolve(virtual.ip, 81)
        )


async def test_a_delivered_record_is_in_every_members_table_when_deliver_returns() -> None:
    async with running("a") as a, running("b") as b, running("c") as c:
        for peer in (b, c):
            assert await peer.join([seed(a)]) == 1
        everyone = {"a": "alive", "b": "alive", "c": "alive"}
        await eventually("members agree", lambda: statuses(a) == everyone)
        record, _ = attach(a._daemon, "client")
        before = a.core.stats.deliveries_sent
        assert await a.deliver([record]) == []
        # Not by gossip, which may not have run yet: straight, and acked.
        assert a.core.stats.deliveries_sent == before + 2
        for peer in (b, c):
            table = peer._daemon.node.table
            assert table.virtual_of_client(record.real_host, record.port_lo) == record.vip


async def test_deliver_names_a_member_that_does_not_answer() -> None:
    async with running("a") as a:
        async with running("b") as b:
            assert await b.join([seed(a)]) == 1
            await eventually("joined", lambda: statuses(a) == {"a": "alive", "b": "alive"})
        # b is gone without a word: a holds it alive until its probes fail.
        _, records = attach(a._daemon, "client")
        with trio.fail_after(5):
            assert await a.deliver(records) == ["b"]
        assert a.core.stats.deliveries_unacked == 1


async def test_a_member_with_our_name_is_reported_by_join() -> None:
    async with running("twin") as a, running("twin") as b:
        await a.join([seed(b)])
        await eventually("conflict seen", lambda: a.name_conflicts() == [seed(b)])
        assert statuses(a) == {"twin": "alive"}  # never one member for two nodes


async def test_a_seed_that_is_this_node_is_named_not_counted_as_joined() -> None:
    # Its own address, and another address that reaches it (it binds the
    # wildcard): before, the first said "no member answered" and the second
    # counted as joined, with no member but itself.
    async with running("a", bind="0.0.0.0:0", advertise="127.0.0.1:0") as a:
        port = a.address[1]
        assert await a.join([seed(a)]) == 0
        assert a.self_seeds() == [seed(a)]
        assert await a.join([f"127.0.0.2:{port}"]) == 0
        assert a.self_seeds() == [f"127.0.0.2:{port}"]
        both = [f"localhost:{port}", f"127.0.0.2:{port}", f"127.0.0.2:{port}"]
        assert await a.join(both) == 0
        assert sorted(a.self_seeds()) == sorted(both)
        assert statuses(a) == {"a": "alive"}
        async with running("b") as b:
            assert await a.join([f"127.0.0.2:{port}", seed(b)]) == 1
            assert a.self_seeds() == [f"127.0.0.2:{port}"]
            await eventually("joined", lambda: statuses(a) == {"a": "alive", "b": "alive"})
            assert await b.join([seed(a)]) == 1 and b.self_seeds() == []


async def test_a_newcomer_with_a_live_members_name_takes_nothing_from_it() -> None:
    # A second daemon started with b's name joins through a: a keeps b where
    # it is, and the newcomer, hearing of a b elsewhere, reports the conflict
    # (which `axnet join` prints).  Before, the newcomer's later start won:
    # every member moved b to its address and withdrew b's services.
    async with running("a") as a, running("b") as b:
        assert await b.join([seed(a)]) == 1
        await eventually("joined", lambda: statuses(a) == {"a": "alive", "b": "alive"})
        async with running("b") as twin:
            await twin.join([seed(a)])
            await eventually("conflict seen", lambda: twin.name_conflicts() == [seed(b)])
            await trio.sleep(0.5)  # what the twin gossips meanwhile changes nothing
            [seen] = [m for m in a.members() if m["name"] == "b"]
            assert (seen["gossip"], seen["status"]) == (seed(b), "alive")
            assert a.core.stats.name_conflicts >= 1


async def test_a_peers_records_for_reserved_addresses_are_dropped_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running("a") as cluster:
        daemon = cluster._daemon  # the node this cluster feeds
        good = ["s", "10.9.0.1", 80, "192.0.2.9", 20000, "n2", "b1", "", [], 1, False, 0.0]
        hijack = ["s", "127.0.0.1", 5432, "192.0.2.9", 20001, "n2", "b2", "", [], 1, False, 0.0]
        await merge_state(cluster, [good, hijack, hijack])
        table = daemon.node.table
        assert table.resolve(ipaddress.ip_address("10.9.0.1"), 80) is not None
        assert table.resolve(ipaddress.ip_address("127.0.0.1"), 5432) is None
        assert cluster.stats()["records"]["malformed"] == 2
        warnings = [r.getMessage() for r in caplog.records if "dropped malformed" in r.getMessage()]
        assert warnings == [
            "dropped malformed records count=2 first=127.0.0.1 cannot be a virtual IP: it "
            "overlaps 127.0.0.0/8 (loopback, unspecified, link-local, multicast or reserved)"
        ]


async def test_a_gone_members_records_do_not_come_back() -> None:
    # n2 is declared dead and its records withdrawn; a broadcast of a newer
    # record of it, still on its way, must not bring it (or n2) back.
    async with running("a") as cluster:
        table = cluster._daemon.node.table
        n2 = swim.Member(
            name="n2", address=("192.0.2.9", 7946), incarnation=1, state=swim.MemberState.DEAD
        )
        cluster._on_event(swim.MemberDead(member=n2, accuser="a"))
        late = ["s", "10.9.0.1", 80, "192.0.2.9", 20000, "n2", "b1", "", [], 5, False, 0.0]
        await merge_state(cluster, [late])
        assert table.resolve(ipaddress.ip_address("10.9.0.1"), 80) is None
        assert cluster.stats()["records"]["of_gone_members"] == 1
        # Back (its revival republishes): its records are taken again.
        cluster._on_event(swim.MemberJoined(member=attrs.evolve(n2, state=swim.MemberState.ALIVE)))
        await merge_state(cluster, [late])
        assert table.resolve(ipaddress.ip_address("10.9.0.1"), 80) is not None


STRAY = ["s", "10.9.0.1", 80, "192.0.2.9", 20000, "n2", "b1", "", [], 5, False, 0.0]
N2 = swim.Member(name="n2", address=("192.0.2.9", 7946), incarnation=1, state=swim.MemberState.DEAD)


def stray_service(i: int) -> list[object]:
    """A distinct service record of n2, for i < 2**24."""
    vip = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
    return ["s", vip, 80, "192.0.2.9", 20000, "n2", f"b{i}", "", [], 5, False, 0.0]


def stray_served(cluster: GossipCluster) -> bool:
    return cluster._daemon.node.table.resolve(ipaddress.ip_address("10.9.0.1"), 80) is not None


def expire_tombstones(cluster: GossipCluster) -> None:
    cluster._daemon.node.table.expire(time.time() + 2 * TOMBSTONE_TTL)


async def test_records_of_a_node_that_is_no_member_are_withdrawn_after_a_grace() -> None:
    # n2 is no member here (a peer partitioned since n2 was forgotten brings
    # its records back, say): no member event would ever withdraw them.
    async with running("a") as cluster:
        await merge_state(cluster, [STRAY])
        assert cluster.sweep_orphans(100.0) == 0
        assert stray_served(cluster)  # n2 may be joining: its records stay a while
        assert cluster.sweep_orphans(100.0 + ORPHAN_GRACE_S / 2) == 0
        assert stray_served(cluster)
        assert cluster.sweep_orphans(100.0 + ORPHAN_GRACE_S) == 1
        assert not stray_served(cluster)
        assert cluster.stats()["records"]["non_members_withdrawn"] == 1
        # Once its tombstones are gone, the same record again is not taken...
        expire_tombstones(cluster)
        await merge_state(cluster, [STRAY])
        assert not stray_served(cluster)
        assert cluster.stats()["records"]["of_gone_members"] == 1
        # ...until n2 joins.
        alive = attrs.evolve(N2, state=swim.MemberState.ALIVE)
        cluster._on_event(swim.MemberJoined(member=alive))
        await merge_state(cluster, [STRAY])
        assert stray_served(cluster)


async def test_a_forgotten_members_records_do_not_come_back() -> None:
    # The core forgets a dead member after a while; a peer partitioned since
    # before its death still gossips its records.
    async with running("a") as cluster:
        await merge_state(cluster, [STRAY])
        cluster._on_event(swim.MemberDead(member=N2, accuser="a"))
        assert not stray_served(cluster)
        cluster._on_event(swim.MemberReaped(member=N2))
        expire_tombstones(cluster)
        await merge_state(cluster, [STRAY])
        assert not stray_served(cluster)


async def test_a_members_records_are_never_swept() -> None:
    async with running("a") as a, running("b") as b:
        assert await b.join([seed(a)]) == 1
        virtual = await publish_service(b, b._daemon, 82)
        await eventually("replicated", lambda: a._daemon.node.table.resolve(virtual.ip, 82))
        now = trio.current_time()
        for cluster in (a, b):  # b: its own records
            assert cluster.sweep_orphans(now) == 0
            assert cluster.sweep_orphans(now + 10 * ORPHAN_GRACE_S) == 0
            assert cluster._daemon.node.table.resolve(virtual.ip, 82) is not None


async def test_a_large_state_is_merged_while_the_loop_goes_on() -> None:
    # 100 000 records take seconds to decode and merge.  A daemon whose loop
    # stalled that long would miss its probes and be declared dead, so the
    # merge runs beside the loop, which gets a turn at least once a chunk.
    big = [stray_service(i) for i in range(100_000)]
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            await trio.sleep(0.001)
            turns += 1

    async with running("a") as cluster, trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await merge_state(cluster, big)
        nursery.cancel_scope.cancel()
    assert len(cluster._daemon.node.table.live_services()) == 100_000
    assert turns >= len(big) // MERGE_CHUNK


async def test_a_large_table_is_out_of_the_collectors_full_walk() -> None:
    # A full collection walks every object the collector tracks, with the
    # GIL held: about 0.4 s for a table of 200 000.  Records hold no cycles,
    # so a grown table is frozen out of that walk (axnet._heap).
    try:
        async with running("a") as cluster:
            await merge_state(cluster, [stray_service(i) for i in range(20_000)])
            walked = {id(o) for o in gc.get_objects()}
            services = cluster._daemon.node.table.services.values()
            assert len(services) == 20_000
            assert not any(id(record) in walked for record in services)
    finally:
        gc.unfreeze()


async def test_our_push_pull_state_is_the_whole_table_as_it_changes() -> None:
    # local_state() reuses what it packed before: never a stale record.
    async with running("a") as cluster:
        table = cluster._daemon.node.table
        await merge_state(cluster, [stray_service(i) for i in range(3)])
        assert cluster.local_state() == encode_state(list(table.records()))
        moved = stray_service(1)
        moved[4], moved[9] = 20001, 6  # a newer version, on another port
        await merge_state(cluster, [moved])
        await publish_service(cluster, cluster._daemon, 83)
        state = cluster.local_state()
        assert state == encode_state(list(table.records()))
        records = records_from_state(state).records
        assert len(records) == 5  # three of n2's, our app and its service
        moved_back = [r for r in records if isinstance(r, ServiceRecord) and r.version == 6]
        assert [r.real.port for r in moved_back] == [20001]


async def test_states_past_the_pending_bound_drop_the_oldest() -> None:
    # Push-pull repeats: a state dropped now comes again at that peer's next one.
    states = MAX_PENDING_STATES + 2
    async with running("a") as cluster:
        for i in range(states):  # no checkpoint in between: none merged yet
            cluster.merge_remote_state(pack([stray_service(i)]), join=False)
        await cluster._backlog.wait_merged()
        table = cluster._daemon.node.table
        served = [
            table.resolve(ipaddress.ip_address(f"10.0.0.{i}"), 80) is not None
            for i in range(states)
        ]
        assert served == [False] * 2 + [True] * MAX_PENDING_STATES
        assert cluster.stats()["records"]["states_dropped"] == 2


async def test_the_cores_view_of_a_member_goes_before_what_we_withdrew() -> None:
    # b's return may be queued in the core while its old withdrawal still
    # stands here: what the core holds (alive) decides.
    async with running("a") as a, running("b") as b:
        assert await b.join([seed(a)]) == 1
        await eventually("b known", lambda: statuses(a).get("b") == "alive")
        a._hold_gone("b")
        record = ["s", "10.9.0.7", 80, "192.0.2.9", 20000, "b", "b1", "", [], 5, False, 0.0]
        await merge_state(a, [record])
        assert a._daemon.node.table.resolve(ipaddress.ip_address("10.9.0.7"), 80) is not None


async def test_the_start_up_join_is_under_way_until_a_seed_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gossip_module, "JOIN_BACKOFF_MIN_S", 0.1)
    with socket.socket() as probe:  # a port nobody serves yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with running("b", seeds=(f"127.0.0.1:{port}",)) as b:
        assert b.joining()  # no seed answers
        await trio.sleep(0.5)
        assert b.joining()  # and it keeps trying
        async with running("a", bind=f"127.0.0.1:{port}") as a:
            assert not a.joining()  # no seeds: nothing to wait for
            with trio.fail_after(10):
                await b.wait_joined()
            assert not b.joining()
            assert statuses(b).get("a") == "alive"
