"""Formulas against hashicorp/memberlist's own test vectors.

Vectors from memberlist util_test.go (TestSuspicionTimeout, TestRetransmitLimit)
and suspicion_test.go (TestSuspicion_remainingSuspicionTime, TestSuspicion_Timer).
"""

from __future__ import annotations

import pytest

from swim import Suspicion, remaining_suspicion_time, retransmit_limit, suspicion_timeout
from swim._awareness import Awareness
from swim._math import push_pull_scale


@pytest.mark.parametrize(
    ("n", "expected"),
    # util_test.go: suspicionTimeout(3, n, time.Second) / 3
    [(5, 1.0), (10, 1.0), (50, 1.698), (100, 2.0), (500, 2.698), (1000, 3.0)],
)
def test_suspicion_timeout_vectors(n: int, expected: float) -> None:
    assert suspicion_timeout(3, n, 1.0) / 3 == pytest.approx(expected, abs=1e-9)


def test_suspicion_timeout_lan_defaults() -> None:
    # mult 4, 1 s probes: 4 s up to 10 members, 16 s at 10 000.
    assert suspicion_timeout(4, 10, 1.0) == pytest.approx(4.0)
    assert suspicion_timeout(4, 10_000, 1.0) == pytest.approx(16.0)


@pytest.mark.parametrize(("n", "expected"), [(0, 0), (1, 3), (99, 6)])
def test_retransmit_limit_vectors(n: int, expected: int) -> None:
    # util_test.go TestRetransmitLimit
    assert retransmit_limit(3, n) == expected


@pytest.mark.parametrize(
    ("case", "expected"),
    # suspicion_test.go TestSuspicion_remainingSuspicionTime
    [
        ((0, 3, 0.0, 2.0, 30.0), 30.0),
        ((1, 3, 2.0, 2.0, 30.0), 14.0),
        ((2, 3, 3.0, 2.0, 30.0), 4.81),
        ((3, 3, 4.0, 2.0, 30.0), -2.0),
        ((4, 3, 5.0, 2.0, 30.0), -3.0),
        ((5, 3, 10.0, 2.0, 30.0), -8.0),
    ],
)
def test_remaining_suspicion_time_vectors(
    case: tuple[int, int, float, float, float], expected: float
) -> None:
    # case = (confirmations n, expected k, elapsed, min, max) as in memberlist
    assert remaining_suspicion_time(*case) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    ("confirmers", "expected"),
    # suspicion_test.go TestSuspicion_Timer: k=3, min 500 ms, max 2 s
    [
        ([], 2.0),
        (["me", "foo"], 1.25),
        (["me", "foo", "foo", "foo"], 1.25),
        (["me", "foo", "bar"], 0.81),
        (["me", "foo", "bar", "baz"], 0.5),
        (["me", "foo", "bar", "baz", "zoo"], 0.5),
    ],
)
def test_suspicion_timer_confirmations(confirmers: list[str], expected: float) -> None:
    s = Suspicion(accuser="me", incarnation=1, k=3, minimum=0.5, maximum=2.0, start=100.0)
    for who in confirmers:
        s.confirm(who)
    # memberlist checks these against a real timer with 25 ms slack; the exact
    # value for two confirmations is 2 - 1.5 * log 3 / log 4 = 0.811 s.
    assert s.deadline() - 100.0 == pytest.approx(expected, abs=0.002)


def test_suspicion_confirm_reports_new_information() -> None:
    s = Suspicion(accuser="me", incarnation=1, k=3, minimum=0.5, maximum=2.0, start=0.0)
    assert s.confirm("me") is False
    assert s.confirm("foo") is True
    assert s.confirm("foo") is False


def test_suspicion_zero_k_uses_minimum() -> None:
    # suspicion_test.go TestSuspicion_Timer_ZeroK
    s = Suspicion(accuser="me", incarnation=1, k=0, minimum=0.025, maximum=30.0, start=0.0)
    assert s.confirm("foo") is False
    assert s.deadline() == pytest.approx(0.025)


def test_awareness_scales_and_clamps() -> None:
    a = Awareness(8)
    assert a.scale(1.0) == 1.0
    a.apply_delta(100)
    assert a.score == 7
    assert a.scale(0.5) == 4.0
    a.apply_delta(-100)
    assert a.score == 0


def test_push_pull_scale() -> None:
    assert push_pull_scale(30.0, 32) == 30.0
    assert push_pull_scale(30.0, 33) == 60.0
    assert push_pull_scale(30.0, 10_000) == 30.0 * 10
