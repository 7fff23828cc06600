"""Lifeguard local health multiplier (LHM).

A member that misses its own probe deadlines is more likely slow itself than
surrounded by failures. Its health score rises on missed acks/nacks and on
having to refute a suspicion about itself, falls on each successful probe,
and stretches its own probe interval and timeout by (score + 1), so a
CPU-starved member accuses others less eagerly.
"""

from __future__ import annotations


class Awareness:
    """Health score in [0, max_multiplier - 1]; 0 is healthy."""

    __slots__ = ("_max", "_score")

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError(f"awareness max multiplier must be >= 1, got {max_multiplier}")
        self._max = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        return self._score

    def apply_delta(self, delta: int) -> None:
        """Move the score by `delta`, clamped to [0, max - 1]."""
        self._score = min(self._max - 1, max(0, self._score + delta))

    def scale(self, timeout: float) -> float:
        """`timeout` * (score + 1)."""
        return timeout * (self._score + 1)
