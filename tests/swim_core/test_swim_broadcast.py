from __future__ import annotations

from swim import BroadcastQueue


def test_newer_message_invalidates_older() -> None:
    q = BroadcastQueue()
    q.queue("a", b"old")
    q.queue("b", b"other")
    q.queue("a", b"new")
    assert len(q) == 2
    assert sorted(q.take(1000, 0, 10)) == [b"new", b"other"]


def test_transmit_limit_drops_after_limit() -> None:
    q = BroadcastQueue()
    q.queue("a", b"x")
    for _ in range(3):
        assert q.take(100, 0, 3) == [b"x"]
    assert q.take(100, 0, 3) == []
    assert len(q) == 0


def test_fewest_transmits_first_then_newest() -> None:
    q = BroadcastQueue()
    q.queue("a", b"a")
    assert q.take(100, 0, 5) == [b"a"]
    q.queue("b", b"b")
    q.queue("c", b"c")
    assert q.take(100, 0, 5) == [b"c", b"b", b"a"]


def test_respects_byte_budget() -> None:
    q = BroadcastQueue()
    for i in range(100):
        q.queue(i, bytes(100))
    taken = q.take(1000, 2, 5)
    assert len(taken) == 9
    assert len(q) == 100


def test_prune() -> None:
    q = BroadcastQueue()
    q.queue("a", b"aaaa")
    q.take(100, 0, 10)
    q.take(100, 0, 10)
    q.prune(2)
    assert len(q) == 0


def test_a_holder_is_never_sent_what_it_told_us() -> None:
    q = BroadcastQueue()
    q.queue("a", b"news", ("B",))
    q.queue("b", b"other")
    # Nothing is spent on B for the news: it is still owed two transmits.
    assert q.take(100, 0, 2, "B") == [b"other"]
    assert sorted(q.take(100, 0, 2, "C")) == [b"news", b"other"]
    assert q.take(100, 0, 2, "D") == [b"news"]
    assert len(q) == 0


def test_messages_only_holders_are_offered_give_way_then_go() -> None:
    q = BroadcastQueue()
    for i in range(300):
        q.queue(("held", i), b"h", ("B",))
    q.queue("news", b"news")
    # B is the only member to send to, and holds the 300: the news still
    # gets every transmit it is owed, and the 300 are dropped in the end.
    sent = [q.take(1400, 0, 4, "B") for _ in range(12)]
    assert sent == [[b"news"]] * 4 + [[]] * 8
    assert len(q) == 0


def test_a_full_queue_drops_the_message_spread_widest_oldest_first() -> None:
    q = BroadcastQueue(max_queued=3)
    for key in "abc":
        assert not q.queue(key, key.encode() * 4)
    assert q.queue("d", b"dddd")  # none sent yet: the oldest goes
    assert len(q) == 3
    assert q.take(6, 0, 10) == [b"dddd"]  # room for one: the newest
    assert q.queue("e", b"eeee")  # the one sent goes first
    assert not q.queue("b", b"bbb2")  # a newer message under a key queued
    assert sorted(q.take(100, 0, 10)) == [b"bbb2", b"cccc", b"eeee"]
