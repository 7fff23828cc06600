"""Pure formulas of SWIM and Lifeguard, in seconds.

They follow hashicorp/memberlist (util.go, suspicion.go) so that our timing
matches a well-studied deployment; the tests check memberlist's own vectors.
Durations are float seconds. memberlist computes in integer nanoseconds and
truncates the node scale to milliseconds; the same truncation is kept so the
published vectors come out exactly.
"""

from __future__ import annotations

import math


def node_scale(n: int) -> float:
    """max(1, log10(max(1, n))), truncated to 1/1000 as memberlist does."""
    scale = max(1.0, math.log10(max(1.0, float(n))))
    return math.floor(scale * 1000) / 1000


def suspicion_timeout(suspicion_mult: int, n: int, interval: float) -> float:
    """Minimum suspicion timeout: mult * max(1, log10 N) * probe interval (seconds)."""
    return suspicion_mult * node_scale(n) * interval


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """How many times a broadcast is sent on: mult * ceil(log10(N + 1))."""
    return retransmit_mult * math.ceil(math.log10(n + 1))


def remaining_suspicion_time(
    confirmations: int, k: int, elapsed: float, minimum: float, maximum: float
) -> float:
    """Time left on a suspicion timer after `confirmations` of `k` expected.

    timeout = max(min, max - (max - min)*log(c + 1)/log(k + 1)), floored to the
    millisecond, minus the time already elapsed (may be negative: expired).
    With k < 1 no confirmation is expected and the minimum applies at once.
    """
    if k < 1:
        return minimum - elapsed
    frac = math.log(confirmations + 1) / math.log(k + 1)
    raw = maximum - frac * (maximum - minimum)
    timeout = math.floor(raw * 1000) / 1000
    timeout = max(timeout, minimum)
    return timeout - elapsed


def push_pull_scale(interval: float, n: int) -> float:
    """Push-pull interval stretched for big clusters (memberlist pushPullScale).

    Up to 32 members the interval is used as is; above, it is multiplied by
    ceil(log2 N - log2 32) + 1, so the TCP load per member grows with log N.
    """
    threshold = 32
    if n <= threshold:
        return interval
    multiplier = math.ceil(math.log2(n) - math.log2(threshold)) + 1
    return interval * multiplier
