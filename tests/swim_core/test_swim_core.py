"""Cores joined by a hand-driven link: bytes in, events out."""

from __future__ import annotations

import itertools
import random

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swim import (
    MAX_PACKET_BYTES,
    Config,
    Datagram,
    Delivered,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MemberState,
    MemberSuspected,
    MemberUpdated,
    NameConflict,
    StreamPurpose,
    Swim,
    UserMessage,
)
from swim._messages import (
    MAX_INCARNATION,
    Ack,
    Alive,
    Dead,
    Message,
    Ping,
    PushPull,
    PushPullEntry,
    Suspect,
    UserBroadcast,
    compound,
    decode_envelope,
    encode_message,
)

A = ("10.0.0.1", 7946)
B = ("10.0.0.2", 7946)
C = ("10.0.0.3", 7946)


def make(
    name: str,
    address: tuple[str, int],
    *,
    incarnation: int = 1,
    seed: int = 0,
    config: Config | None = None,
) -> Swim:
    return Swim(
        name=name,
        address=address,
        config=config or Config.lan(),
        rng=random.Random(seed),
        now=0.0,
        incarnation=incarnation,
    )


class Recorder:
    def __init__(self) -> None:
        self.state = b"mine"
        self.merged: list[tuple[bytes, bool]] = []

    def local_state(self) -> bytes:
        return self.state

    def merge_remote_state(self, data: bytes, *, join: bool) -> None:
        self.merged.append((data, join))


def joined_pair(config: Config | None = None) -> tuple[Swim, Swim]:
    a, b = make("a", A, config=config), make("b", B, seed=1, config=config)
    b.join([A], 0.0)
    (request,) = b.take_stream_requests()
    assert request.purpose is StreamPurpose.JOIN
    b.handle_stream_reply(A, a.handle_stream(B, request.data, 0.0), 0.0)
    return a, b


def packet(*messages: Message) -> bytes:
    return compound([encode_message(m) for m in messages])


def test_join_exchanges_members_and_delegate_state() -> None:
    da, db = Recorder(), Recorder()
    a = Swim(name="a", address=A, config=Config.lan(), rng=random.Random(0), now=0.0, delegate=da)
    b = Swim(name="b", address=B, config=Config.lan(), rng=random.Random(1), now=0.0, delegate=db)
    b.join([A], 0.0)
    (request,) = b.take_stream_requests()
    reply = a.handle_stream(B, request.data, 0.0)
    b.handle_stream_reply(A, reply, 0.0)
    assert da.merged == [(b"mine", True)]
    assert db.merged == [(b"mine", True)]
    assert [type(e) for e in a.take_events()] == [MemberJoined]
    assert [type(e) for e in b.take_events()] == [MemberJoined]
    assert {m.name for m in a.members()} == {"a", "b"}


def test_ping_is_answered_with_ack() -> None:
    a = make("a", A)
    a.handle_datagram(B, packet(Ping(seq=7, target="a", source="b")), 0.0)
    (dgram,) = a.take_datagrams()
    assert dgram.dest == B
    assert decode_envelope(dgram.data)[0] == Ack(seq=7)


def test_misdirected_ping_is_ignored() -> None:
    a = make("a", A)
    a.handle_datagram(B, packet(Ping(seq=7, target="zz", source="b")), 0.0)
    assert a.take_datagrams() == []


def test_probe_cycle_with_ack_keeps_member_alive() -> None:
    a, b = joined_pair()
    now = 0.0
    for _ in range(50):
        now = max(now, min(a.next_deadline(), b.next_deadline()))
        a.tick(now)
        b.tick(now)
        for src, dst, _dst_addr in ((a, b, B), (b, a, A)):
            for d in src.take_datagrams():
                dst.handle_datagram(src.local_member.address, d.data, now)
    assert a.member("b") is not None and a.member("b").state is MemberState.ALIVE  # type: ignore[union-attr]
    assert a.stats.probes_sent > 0
    assert a.health_score == 0


def test_unanswered_probe_leads_to_suspect_then_dead() -> None:
    a, _ = joined_pair()
    a.take_events()
    now = 0.0
    events = []
    while now < 60.0:
        now = a.next_deadline()
        a.tick(now)
        a.take_datagrams()
        for request in a.take_stream_requests():
            # TCP fallback pings while b is probed; reconnect attempts once it is dead.
            assert request.purpose in (StreamPurpose.PING, StreamPurpose.PUSH_PULL)
            a.stream_failed(request.dest, now)
            if request.purpose is StreamPurpose.PUSH_PULL:
                assert a.member("b").state is MemberState.DEAD  # type: ignore[union-attr]
        events.extend(a.take_events())
    kinds = [type(e) for e in events]
    assert kinds[:2] == [MemberSuspected, MemberDead]
    assert a.stats.reconnects >= 1
    # Two members: no confirmations expected (k = 0), so the minimum applies:
    # 4 * max(1, log10 2) * 1 s = 4 s after the failed probe.
    assert a.member("b").state is MemberState.DEAD  # type: ignore[union-attr]


def test_buddy_system_ping_carries_suspicion() -> None:
    a, _ = joined_pair()
    a.handle_datagram(B, packet(Suspect(incarnation=1, member="b", accuser="c")), 0.0)
    a.take_datagrams()
    now = 0.0
    while True:
        now = a.next_deadline()
        a.tick(now)
        sent = a.take_datagrams()
        pings = [d for d in sent if any(isinstance(m, Ping) for m in decode_envelope(d.data))]
        if pings:
            break
    messages = decode_envelope(pings[0].data)
    assert Suspect(incarnation=1, member="b", accuser="a") in messages


def test_refutes_suspicion_about_itself() -> None:
    a = make("a", A, incarnation=5)
    a.handle_datagram(B, packet(Suspect(incarnation=5, member="a", accuser="b")), 0.0)
    assert a.local_member.incarnation == 6
    assert a.local_member.state is MemberState.ALIVE
    assert a.health_score == 1
    assert a.stats.refutations == 1
    a.handle_datagram(B, packet(Dead(incarnation=9, member="a", accuser="b")), 0.0)
    assert a.local_member.incarnation == 10


def test_a_refutation_stays_decodable_at_the_top_incarnation() -> None:
    # An accusation at the highest incarnation peers decode must not push
    # ours above it: a refutation nobody can read would cut us off for good.
    a = make("a", A, incarnation=5)
    a.handle_datagram(B, packet(Suspect(incarnation=MAX_INCARNATION, member="a", accuser="b")), 0.0)
    assert a.local_member.incarnation == MAX_INCARNATION
    a.update_meta(b"x", 0.0)
    assert a.local_member.incarnation == MAX_INCARNATION
    a.handle_datagram(B, packet(Ping(seq=1, target="a", source="b")), 0.0)
    for d in a.take_datagrams():
        decode_envelope(d.data)  # everything it sends, its Alive included, decodes


def test_a_peers_broadcast_too_big_for_a_packet_is_not_queued() -> None:
    a, _ = joined_pair()
    queued = a.pending_broadcasts
    big = UserBroadcast(origin="b", key=b"k", boot=1, seq=1, payload=bytes(2000))
    a.handle_datagram(B, packet(big), 0.0)
    assert a.pending_broadcasts == queued
    assert a.stats.broadcasts_dropped_oversized == 1


def test_one_reply_per_datagram_of_pings() -> None:
    a = make("a", A)
    pings = [Ping(seq=i, target="a", source="b") for i in range(50)]
    a.handle_datagram(B, packet(*pings), 0.0)
    (reply,) = a.take_datagrams()
    assert decode_envelope(reply.data)[0] == Ack(seq=0)
    assert a.stats.messages_dropped == 49


def test_update_meta_after_leave_does_not_bring_the_member_back() -> None:
    a = make("a", A, incarnation=3)
    a.leave(0.0)
    a.update_meta(b"late", 0.0)
    assert a.local_member.state is MemberState.LEFT
    assert a.local_member.incarnation == 3


def test_alive_with_higher_incarnation_updates_meta() -> None:
    a, _ = joined_pair()
    a.take_events()
    a.handle_datagram(B, packet(Alive(incarnation=2, member="b", address=B, meta=b"x")), 0.0)
    (event,) = a.take_events()
    assert isinstance(event, MemberUpdated)
    assert event.member.meta == b"x"


def test_a_live_member_keeps_its_address_against_a_newcomer_with_its_name() -> None:
    # A second node started with b's name: whatever its incarnation, b stays
    # where it is (else the newest start would take over b's name, and the
    # cluster would withdraw b's services for as long as it runs).
    a, _ = joined_pair()
    a.take_events()
    a.handle_datagram(C, packet(Alive(incarnation=99, member="b", address=C, meta=b"")), 0.0)
    [b] = [m for m in a.members() if m.name == "b"]
    assert (b.address, b.state) == (B, MemberState.ALIVE)
    assert a.take_events() == []
    assert a.stats.name_conflicts == 1
    # Once b has left, a node of that name may come back from elsewhere.
    a.handle_datagram(B, packet(Dead(incarnation=1, member="b", accuser="b")), 0.0)
    a.handle_datagram(C, packet(Alive(incarnation=99, member="b", address=C, meta=b"")), 0.0)
    [b] = [m for m in a.members() if m.name == "b"]
    assert (b.address, b.state) == (C, MemberState.ALIVE)


def test_a_member_restarted_elsewhere_takes_its_name_once_its_old_self_is_dead() -> None:
    # b's host came back at C before b was found dead: its Alive is held,
    # not dropped, and takes the name the moment b dies (before, only at
    # the next push-pull, 30 s later).  Its news and b's death both travel.
    a, _ = joined_pair()
    a.take_events()
    a.handle_datagram(C, packet(Alive(incarnation=99, member="b", address=C, meta=b"")), 0.0)
    assert a.member("b").address == B  # type: ignore[union-attr]
    a.handle_datagram(B, packet(Dead(incarnation=1, member="b", accuser="x")), 0.0)
    events = a.take_events()
    assert [type(e) for e in events] == [MemberDead, MemberJoined]
    assert [e.member.address for e in events] == [B, C]  # type: ignore[union-attr]
    b = a.member("b")
    assert b is not None and (b.address, b.state, b.incarnation) == (C, MemberState.ALIVE, 99)
    # The death goes out too (to b at C, the only other member; its own
    # Alive never goes back to it).
    assert Dead in {type(m) for d in run_gossip(a) for m in decode_envelope(d.data)}


def test_a_claim_to_a_members_name_long_unheard_or_outlived_takes_nothing() -> None:
    # A node refused b's name long ago (a twin, stopped since), or one that
    # b outlived by proving itself alive since, must not come back as b,
    # at an address nobody answers, when b leaves or dies.
    twin = Alive(incarnation=50, member="b", address=C, meta=b"")
    a, _ = joined_pair()
    a.handle_datagram(C, packet(twin), 0.0)
    a.take_events()
    a.handle_datagram(B, packet(Dead(incarnation=1, member="b", accuser="b")), 3600.0)
    assert [type(e) for e in a.take_events()] == [MemberLeft]
    assert a.member("b").address == B  # type: ignore[union-attr]
    a, _ = joined_pair()
    a.handle_datagram(C, packet(twin), 0.0)
    a.handle_datagram(B, packet(Alive(incarnation=2, member="b", address=B, meta=b"")), 1.0)
    a.take_events()
    a.handle_datagram(B, packet(Dead(incarnation=2, member="b", accuser="b")), 2.0)
    assert [type(e) for e in a.take_events()] == [MemberLeft]


def run_gossip(member: Swim) -> list[Datagram]:
    """The datagrams *member* sends over a few gossip intervals."""
    out: list[Datagram] = []
    for _ in range(10):
        member.tick(member.next_deadline())
        out += member.take_datagrams()
    return out


def test_update_meta_bumps_incarnation() -> None:
    a = make("a", A, incarnation=3)
    a.update_meta(b"role=db", 0.0)
    assert a.local_member.incarnation == 4
    assert a.local_member.meta == b"role=db"


def test_leave_is_dead_by_self() -> None:
    a, b = joined_pair()
    b.take_events()
    a.leave(0.0)
    assert a.local_member.state is MemberState.LEFT
    a.tick(a.next_deadline())
    for d in a.take_datagrams():
        b.handle_datagram(A, d.data, 0.0)
    events = b.take_events()
    assert any(isinstance(e, MemberLeft) for e in events)
    assert b.member("a").state is MemberState.LEFT  # type: ignore[union-attr]


def test_a_leave_by_a_members_name_from_another_node_takes_nothing_from_it() -> None:
    # A second node started with b's name is refused; when it is stopped,
    # its leave (gossiped, and in its push-pull) must not be b's: before,
    # a marked b left, and its driver withdrew every record of b's.
    a, _ = joined_pair()
    a.take_events()
    twin = make("b", C, incarnation=50, seed=2)
    twin.join([A], 0.0)
    (request,) = twin.take_stream_requests()
    twin.handle_stream_reply(A, a.handle_stream(C, request.data, 0.0), 0.0)
    assert NameConflict(name="b", address=B) in twin.take_events()
    twin.leave(1.0)
    now = 1.0
    for _ in range(20):
        now = twin.next_deadline()
        twin.tick(now)
        for datagram in twin.take_datagrams():
            if datagram.dest == A:
                a.handle_datagram(C, datagram.data, now)
    twin.join([A], now)
    (request,) = twin.take_stream_requests()
    a.handle_stream(C, request.data, now)
    assert twin.local_member.state is MemberState.LEFT
    seen = a.member("b")
    assert seen is not None and (seen.address, seen.state) == (B, MemberState.ALIVE)
    assert not [e for e in a.take_events() if isinstance(e, MemberLeft)]
    assert a.stats.leaves_ignored >= 2  # by gossip and by push-pull


def test_a_leave_at_another_incarnation_or_address_is_ignored() -> None:
    a, _ = joined_pair()  # b is at B, incarnation 1
    a.take_events()
    queued = a.pending_broadcasts
    a.handle_datagram(C, packet(Dead(incarnation=7, member="b", accuser="b")), 0.0)
    other = PushPullEntry(name="b", address=C, incarnation=7, state=MemberState.LEFT, meta=b"")
    gone = PushPull(join=False, members=(other,), user_state=b"")
    a.handle_stream(C, compound([encode_message(gone)]), 0.0)
    assert a.member("b").state is MemberState.ALIVE  # type: ignore[union-attr]
    assert a.stats.leaves_ignored == 2
    assert a.pending_broadcasts == queued  # nor told on: it is no news of b's
    # From b's own address (push-pull), at any incarnation of b's, it is b's leave.
    own = attrs.evolve(other, address=B)
    a.handle_stream(B, compound([encode_message(attrs.evolve(gone, members=(own,)))]), 0.0)
    assert a.member("b").state is MemberState.LEFT  # type: ignore[union-attr]
    assert [type(e) for e in a.take_events()] == [MemberLeft]


def test_a_gossiped_leave_at_the_members_incarnation_is_its_leave() -> None:
    a, _ = joined_pair()
    a.take_events()
    a.handle_datagram(C, packet(Dead(incarnation=1, member="b", accuser="b")), 0.0)
    assert a.member("b").state is MemberState.LEFT  # type: ignore[union-attr]
    assert a.stats.leaves_ignored == 0


def test_a_member_declared_left_by_another_node_of_its_name_refutes() -> None:
    # Peers of the previous version still take such a leave: the member
    # reasserts itself above it as soon as it hears of it.
    _, b = joined_pair()
    b.handle_datagram(A, packet(Dead(incarnation=50, member="b", accuser="b")), 0.0)
    assert (b.local_member.state, b.local_member.incarnation) == (MemberState.ALIVE, 51)
    assert b.stats.refutations == 1


def run_alone(member: Swim, until: float) -> list[object]:
    """Tick a member that hears nobody until `until`; its events."""
    events: list[object] = []
    now = 0.0
    while now < until:
        now = min(member.next_deadline(), until)
        member.tick(now)
        member.take_datagrams()
        for request in member.take_stream_requests():
            member.stream_failed(request.dest, now)
        events.extend(member.take_events())
    return events


REAPING = attrs.evolve(
    Config.lan(), tombstone_timeout=100.0, reconnect_timeout=200.0, reap_interval=5.0
)


def test_a_left_member_is_forgotten_after_the_tombstone_timeout() -> None:
    a, _ = joined_pair(REAPING)
    a.handle_datagram(B, packet(Dead(incarnation=1, member="b", accuser="b")), 0.0)
    assert a.member("b").state is MemberState.LEFT  # type: ignore[union-attr]
    run_alone(a, 99.0)
    assert a.member("b") is not None, "forgotten before its tombstone timeout"
    events = run_alone(a, 110.0)
    assert [e.member.name for e in events if isinstance(e, MemberReaped)] == ["b"]
    assert a.member("b") is None
    assert {m.name for m in a.members()} == {"a"}
    assert a.stats.members_reaped == 1
    # Late news of its death does not bring it back; a new life does.
    a.handle_datagram(B, packet(Dead(incarnation=1, member="b", accuser="b")), 111.0)
    a.handle_datagram(B, packet(Suspect(incarnation=1, member="b", accuser="c")), 111.0)
    assert a.member("b") is None
    a.handle_datagram(B, packet(Alive(incarnation=7, member="b", address=B, meta=b"")), 111.0)
    assert a.member("b").state is MemberState.ALIVE  # type: ignore[union-attr]
    assert [type(e) for e in a.take_events()] == [MemberJoined]


def test_a_failed_member_is_retried_until_the_reconnect_timeout_then_forgotten() -> None:
    a, _ = joined_pair(REAPING)
    a.handle_datagram(B, packet(Dead(incarnation=1, member="b", accuser="c")), 0.0)
    assert a.member("b").state is MemberState.DEAD  # type: ignore[union-attr]
    run_alone(a, 150.0)
    assert a.member("b").state is MemberState.DEAD, "failed members outlive left ones"  # type: ignore[union-attr]
    reconnects = a.stats.reconnects
    assert reconnects >= 1
    events = run_alone(a, 300.0)
    assert [e.member.name for e in events if isinstance(e, MemberReaped)] == ["b"]
    assert a.member("b") is None
    assert a.stats.reconnects <= reconnects + 2  # none once it is forgotten
    # A push-pull from a peer that still holds the tombstone does not revive it.
    c = make("c", ("10.0.0.3", 7946), config=REAPING)
    c.handle_datagram(B, packet(Alive(incarnation=1, member="b", address=B, meta=b"")), 0.0)
    c.handle_datagram(B, packet(Dead(incarnation=1, member="b", accuser="c")), 0.0)
    c.join([A], 300.0)
    (request,) = c.take_stream_requests()
    a.handle_stream(c.local_member.address, request.data, 300.0)
    assert a.member("b") is None
    assert a.member("c").state is MemberState.ALIVE  # type: ignore[union-attr]


def test_user_broadcast_supersedes_by_key_and_is_delivered_once() -> None:
    a, b = joined_pair()
    b.take_events()
    a.broadcast(b"svc", b"v1")
    a.broadcast(b"svc", b"v2")
    assert a.pending_broadcasts >= 1
    a.tick(a.next_deadline())
    for _ in range(5):
        a.tick(a.next_deadline())
        for d in a.take_datagrams():
            b.handle_datagram(A, d.data, 0.0)
    users = [e for e in b.take_events() if isinstance(e, UserMessage)]
    assert users == [UserMessage(sender="a", key=b"svc", payload=b"v2")]
    # An old version arriving late is not delivered.
    stale = UserBroadcast(origin="a", key=b"svc", boot=1, seq=1, payload=b"v1")
    b.handle_datagram(A, packet(stale), 0.0)
    assert b.take_events() == []


def test_a_member_alone_keeps_its_broadcasts_bounded() -> None:
    # The first member of a cluster has nobody to send to: it kept every
    # broadcast of its life (about 1 kB per app started on its node), and
    # replayed them all to the first member that came.
    import tracemalloc

    from swim._broadcast import MAX_QUEUED

    a = make("a", A)
    tracemalloc.start()
    try:
        for i in range(MAX_QUEUED + 100):
            a.broadcast(b"app%d" % i, b"x" * 100)
            a.take_events()  # Delivered, to nobody
        assert a.pending_broadcasts == MAX_QUEUED
        assert a.stats.broadcasts_dropped_full == 100 + 1  # and its own Alive
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            a.broadcast(b"later%d" % i, b"x" * 100)
            a.take_events()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Nor does it remember its own keys (which it never reads): 20 000 of
    # them took about 4 MB.
    assert grown < 500_000


def test_news_is_never_sent_back_to_who_told_us_nor_to_its_origin() -> None:
    a, _ = joined_pair()
    d = ("10.0.0.4", 7946)
    members = [Alive(incarnation=1, member=n, address=x, meta=b"") for n, x in (("c", C), ("d", d))]
    a.handle_datagram(B, packet(*members), 0.0)
    news = UserBroadcast(origin="c", key=b"svc", boot=1, seq=1, payload=b"for d")
    a.handle_datagram(B, packet(news), 0.0)
    sent_to = []
    for _ in range(200):
        a.tick(a.next_deadline())
        sent_to += [g.dest for g in a.take_datagrams() if news in decode_envelope(g.data)]
    # Every transmit the limit allows (4 with four members) went to d.
    assert sent_to == [d] * 4


def test_broadcasts_from_nobody_we_know_buy_no_memory() -> None:
    a, _ = joined_pair()
    a.take_events()
    queued = a.pending_broadcasts
    made_up = [
        UserBroadcast(origin=f"ghost{i}", key=b"k", boot=1, seq=1, payload=b"x") for i in range(50)
    ]
    a.handle_datagram(B, packet(*made_up), 0.0)
    assert a.take_events() == []
    assert a.pending_broadcasts == queued
    assert a.stats.broadcasts_dropped_unknown == 50
    # A new member's broadcast packed before its Alive is delivered.
    c = UserBroadcast(origin="c", key=b"k", boot=1, seq=1, payload=b"c")
    a.handle_datagram(C, packet(c, Alive(incarnation=1, member="c", address=C, meta=b"")), 0.0)
    assert UserMessage(sender="c", key=b"k", payload=b"c") in a.take_events()

    # A member's own is delivered, even while we hold it dead: a member that
    # refutes its death republishes, and its news may come before its Alive.
    def from_b(seq: int, payload: bytes) -> None:
        a.handle_datagram(
            B, packet(UserBroadcast(origin="b", key=b"k", boot=1, seq=seq, payload=payload)), 0.0
        )

    from_b(1, b"x")
    assert a.take_events() == [UserMessage(sender="b", key=b"k", payload=b"x")]
    a.handle_datagram(B, packet(Dead(incarnation=1, member="b", accuser="c")), 0.0)
    a.take_events()
    from_b(2, b"y")
    assert a.take_events() == [UserMessage(sender="b", key=b"k", payload=b"y")]


def _ack_all(member: Swim, src: tuple[str, int], datagrams: list[Datagram]) -> list[Datagram]:
    """Hand *datagrams* to *member*; the datagrams it sends back."""
    for datagram in datagrams:
        member.handle_datagram(src, datagram.data, 0.0)
    return member.take_datagrams()


def test_deliver_sends_to_every_member_alive_and_reports_once_all_acked() -> None:
    a, b = joined_pair()
    c = make("c", C, seed=2)  # has never heard of a: a's alive comes along
    a.handle_datagram(C, packet(Alive(incarnation=1, member="c", address=C, meta=b"")), 0.0)
    a.handle_datagram(
        C, packet(Alive(incarnation=1, member="d", address=("10.0.0.4", 7946), meta=b"")), 0.0
    )
    a.handle_datagram(C, packet(Dead(incarnation=1, member="d", accuser="c")), 0.0)
    a.take_events()
    a.take_datagrams()
    token = a.deliver([(b"k1", b"one"), (b"k2", b"two")], 0.0)
    sent = a.take_datagrams()
    assert sorted(d.dest for d in sent) == [B, C]  # one datagram each; none to the dead
    assert a.take_events() == []
    for member, address in ((b, B), (c, C)):
        member.take_events()
        (to_member,) = [d for d in sent if d.dest == address]
        replies = _ack_all(member, A, [to_member])
        users = [e for e in member.take_events() if isinstance(e, UserMessage)]
        assert users == [
            UserMessage(sender="a", key=b"k1", payload=b"one"),
            UserMessage(sender="a", key=b"k2", payload=b"two"),
        ]
        assert any(isinstance(m, Ack) for r in replies for m in decode_envelope(r.data))
        _ack_all(a, address, replies)
        events = [e for e in a.take_events() if isinstance(e, Delivered)]
        assert events == ([] if member is b else [Delivered(token=token, missing=())])
    assert a.stats.deliveries_sent == 2
    assert a.stats.deliveries_unacked == 0
    # Gossip still carries them too (a lost datagram is not the end).
    assert a.pending_broadcasts >= 2


def test_deliver_names_the_members_that_did_not_ack_in_the_probe_timeout() -> None:
    a, b = joined_pair()
    a.handle_datagram(C, packet(Alive(incarnation=1, member="c", address=C, meta=b"")), 0.0)
    a.take_datagrams()
    a.take_events()
    token = a.deliver([(b"k", b"v")], 10.0)
    sent = a.take_datagrams()
    assert a.next_deadline() <= 10.0 + a.config.probe_timeout
    _ack_all(a, B, _ack_all(b, A, [d for d in sent if d.dest == B]))
    a.tick(10.0 + a.config.probe_timeout)
    delivered = [e for e in a.take_events() if isinstance(e, Delivered)]
    assert delivered == [Delivered(token=token, missing=("c",))]
    assert a.stats.deliveries_unacked == 1
    # c's late ack is an ack of nothing now.
    (to_c,) = [d for d in sent if d.dest == C]
    ping = next(m for m in decode_envelope(to_c.data) if isinstance(m, Ping))
    a.handle_datagram(C, packet(Ack(seq=ping.seq)), 10.5)
    assert [e for e in a.take_events() if isinstance(e, Delivered)] == []


def test_a_member_that_missed_a_delivery_is_not_waited_for_until_it_acks_again() -> None:
    a, _ = joined_pair()
    a.handle_datagram(C, packet(Alive(incarnation=1, member="c", address=C, meta=b"")), 0.0)
    a.take_datagrams()
    a.take_events()

    def deliver(now: float) -> tuple[int, dict[tuple[str, int], int]]:
        token = a.deliver([(b"k", b"%d" % now)], now)
        pings = {
            d.dest: m.seq
            for d in a.take_datagrams()
            for m in decode_envelope(d.data)
            if isinstance(m, Ping)
        }
        return token, pings

    def delivered() -> list[Delivered]:
        return [e for e in a.take_events() if isinstance(e, Delivered)]

    first, pings = deliver(0.0)  # c never acks it
    a.handle_datagram(B, packet(Ack(seq=pings[B])), 0.0)
    a.tick(a.config.probe_timeout)
    assert delivered() == [Delivered(token=first, missing=("c",))]
    # Still sent to c, but over once b has acked.
    second, pings = deliver(1.0)
    assert set(pings) == {B, C}
    a.handle_datagram(B, packet(Ack(seq=pings[B])), 1.0)
    assert delivered() == [Delivered(token=second, missing=())]
    # c acks that one late: it is waited for again.
    a.handle_datagram(C, packet(Ack(seq=pings[C])), 1.1)
    third, pings = deliver(2.0)
    a.handle_datagram(B, packet(Ack(seq=pings[B])), 2.0)
    assert delivered() == []
    a.handle_datagram(C, packet(Ack(seq=pings[C])), 2.0)
    assert delivered() == [Delivered(token=third, missing=())]


def test_deliver_with_nobody_to_tell_is_over_at_once() -> None:
    a = make("a", A)
    token = a.deliver([(b"k", b"v")], 0.0)
    assert a.take_events() == [Delivered(token=token, missing=())]
    assert a.take_datagrams() == []


def test_deliver_packs_what_does_not_fit_one_packet_into_several() -> None:
    a, b = joined_pair()
    a.take_datagrams()
    b.take_events()
    items = [(b"k%d" % i, bytes([i]) * 400) for i in range(7)]
    token = a.deliver(items, 0.0)
    sent = a.take_datagrams()
    assert len(sent) > 1
    assert all(len(d.data) <= MAX_PACKET_BYTES for d in sent)
    _ack_all(a, B, _ack_all(b, A, sent))
    users = [e for e in b.take_events() if isinstance(e, UserMessage)]
    assert sorted(e.key for e in users) == sorted(k for k, _ in items)
    assert [e for e in a.take_events() if isinstance(e, Delivered)] == [
        Delivered(token=token, missing=())
    ]


def test_broadcast_keys_are_bounded_oldest_forgotten_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("swim._core.MAX_USER_KEYS", 10)
    a, _ = joined_pair()
    a.take_events()

    def send(key: bytes, seq: int) -> list[object]:
        message = UserBroadcast(origin="b", key=key, boot=1, seq=seq, payload=b"")
        a.handle_datagram(B, packet(message), 0.0)
        return [e for e in a.take_events() if isinstance(e, UserMessage)]

    for i in range(20):  # every new key is taken; the oldest ones are forgotten
        assert len(send(b"%d" % i, 1)) == 1
    assert a.stats.broadcast_keys_forgotten == 10
    assert send(b"19", 1) == []  # a replay of a key still held is not news
    assert len(send(b"0", 1)) == 1  # one forgotten is news again (the app's versions judge)


@pytest.mark.parametrize("seed", range(12))
def test_a_probe_round_goes_on_after_a_mass_reap(seed: int) -> None:
    # 500 members leave and are reaped in one sweep, in the middle of a probe
    # round: the one live member is probed every interval after it (before,
    # up to 90 intervals went by while the old round's indices ran out).
    a = make("a", A, seed=seed, config=REAPING)
    a.handle_datagram(B, packet(Alive(incarnation=1, member="b", address=B, meta=b"")), 0.0)
    for i in range(500):
        name, address = f"m{i}", (f"10.1.{i // 250}.{i % 250 + 1}", 7946)
        alive = Alive(incarnation=1, member=name, address=address, meta=b"")
        a.handle_datagram(
            address, packet(alive, Dead(incarnation=1, member=name, accuser=name)), 0.0
        )
    now, probed_b = 0.0, []
    while now < 200.0:
        now = a.next_deadline()
        a.tick(now)
        for d in a.take_datagrams():
            for message in decode_envelope(d.data):
                if d.dest == B and isinstance(message, Ping):
                    probed_b.append(now)
                    a.handle_datagram(B, packet(Ack(seq=message.seq)), now)  # b answers
        a.take_stream_requests()
    assert a.stats.members_reaped == 500
    after = [t for t in probed_b if t > 100.0]
    gaps = [later - earlier for earlier, later in itertools.pairwise(after)]
    assert max(gaps) <= 2.0, gaps


def test_oversized_broadcast_is_refused() -> None:
    a = make("a", A)
    with pytest.raises(ValueError, match="does not fit in a packet"):
        a.broadcast(b"k", bytes(2000))


def test_packets_stay_under_limit() -> None:
    a, _ = joined_pair()
    for i in range(200):
        a.broadcast(str(i).encode(), bytes(50))
    now = 0.0
    sizes = []
    for _ in range(20):
        now = a.next_deadline()
        a.tick(now)
        sizes += [len(d.data) for d in a.take_datagrams()]
    assert sizes and max(sizes) <= 1400


def test_garbage_is_counted_not_raised() -> None:
    a = make("a", A)
    a.handle_datagram(B, b"\x01\xc1", 0.0)
    a.handle_datagram(B, b"\x81" + bytes(40), 0.0)
    assert a.stats.packets_dropped_malformed == 1
    assert a.stats.packets_dropped_auth == 1
    assert a.handle_stream(B, b"junk", 0.0) == b""


# -- invariants under random input --------------------------------------------------

member_names = st.sampled_from(["a", "b", "c", "d"])
incarnations = st.integers(min_value=0, max_value=6)
inputs = st.one_of(
    st.builds(
        Alive,
        incarnation=incarnations,
        member=member_names,
        address=st.just(B),
        meta=st.sampled_from([b"", b"m"]),
    ),
    st.builds(Suspect, incarnation=incarnations, member=member_names, accuser=member_names),
    st.builds(Dead, incarnation=incarnations, member=member_names, accuser=member_names),
    st.builds(Ping, seq=st.integers(0, 5), target=member_names, source=member_names),
    st.builds(Ack, seq=st.integers(0, 5)),
    st.floats(min_value=0.0, max_value=20.0),  # advance time and tick
    st.just("leave"),
)


def test_a_suspicion_a_failed_probe_confirms_into_the_past_ends_in_that_tick() -> None:
    # Found by the property test below: b suspects d at 2 s; our own probe
    # of d fails at 13 s and confirms it, which shortens the suspicion to
    # before 13 s.  d is dead at once, not left as a timer already due.
    a = make("a", A, incarnation=2)
    peer = ("10.0.0.2", 7946)
    a.handle_datagram(peer, packet(Alive(incarnation=0, member="c", address=peer, meta=b"")), 0.0)
    a.tick(1.0)
    a.handle_datagram(peer, packet(Ack(seq=1)), 1.0)
    for name in ("b", "d"):
        a.handle_datagram(
            peer, packet(Alive(incarnation=0, member=name, address=peer, meta=b"")), 1.0
        )
    a.handle_datagram(peer, packet(Suspect(incarnation=0, member="d", accuser="b")), 1.0)
    a.tick(2.0)
    a.tick(13.0)
    assert a.next_deadline() > 13.0
    assert a.member("d").state is MemberState.DEAD  # type: ignore[union-attr]


@settings(max_examples=200, deadline=None)
@given(st.lists(inputs, max_size=40))
def test_random_sequences_keep_invariants(steps: list[object]) -> None:
    a = make("a", A, incarnation=2)
    now = 0.0
    seen: dict[str, int] = {}
    for step in steps:
        if isinstance(step, float):
            now += step
            a.tick(now)
            assert a.next_deadline() > now, "a due timer survived tick()"
        elif step == "leave":
            a.leave(now)
        else:
            assert not isinstance(step, str)
            a.handle_datagram(B, packet(step), now)  # type: ignore[arg-type]
        for d in a.take_datagrams():
            assert isinstance(d, Datagram) and len(d.data) <= 1400
            decode_envelope(d.data)
        a.take_stream_requests()
        a.take_events()
        for m in a.members():
            assert m.incarnation >= seen.get(m.name, 0), "incarnation went down"
            seen[m.name] = m.incarnation
        me = a.local_member
        if a.leaving:
            assert me.state is MemberState.LEFT
        else:
            assert me.state is MemberState.ALIVE, "declared itself dead without leaving"
        assert a.num_live() == sum(
            1 for m in a.members() if m.state in (MemberState.ALIVE, MemberState.SUSPECT)
        )


def test_another_member_with_our_name_is_reported_once_and_not_fought() -> None:
    a = make("a", A, incarnation=5)
    twin = Alive(incarnation=9, member="a", address=B, meta=b"")
    for _ in range(3):
        a.handle_datagram(B, packet(twin), 0.0)
    assert a.take_events() == [NameConflict(name="a", address=B)]
    assert a.local_member.incarnation == 5  # no incarnation war
    assert a.stats.name_conflicts == 3


def test_a_join_that_meets_a_member_with_our_name_reports_it_again() -> None:
    # Reported once as gossip goes on, and again at each join that meets it:
    # such a join cannot take effect, and must say why.
    twin, a = make("a", B, seed=1), make("a", A, incarnation=5)
    for _ in range(2):
        a.join([B], 0.0)
        (request,) = a.take_stream_requests()
        a.handle_stream_reply(B, twin.handle_stream(A, request.data, 0.0), 0.0)
        assert a.take_events() == [NameConflict(name="a", address=B)]
    assert [m.name for m in a.members()] == ["a"]
