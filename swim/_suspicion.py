"""Lifeguard dynamic suspicion timer.

A suspicion starts at the maximum timeout and shrinks toward the minimum as
independent members confirm it (each distinct accuser counts once; the first
accuser is not a confirmation). With k expected confirmations the timeout
after c of them is max - (max - min)*log(c + 1)/log(k + 1), never below min.
The timer is pure: it reports its deadline, the core's tick fires it.
"""

from __future__ import annotations

from ._math import remaining_suspicion_time


class Suspicion:
    """One suspicion about one member at one incarnation."""

    __slots__ = ("_confirmers", "_k", "_max", "_min", "_start", "incarnation")

    def __init__(
        self,
        *,
        accuser: str,
        incarnation: int,
        k: int,
        minimum: float,
        maximum: float,
        start: float,
    ) -> None:
        self._confirmers = {accuser}
        self._k = k
        self._min = minimum
        self._max = maximum
        self._start = start
        self.incarnation = incarnation

    @property
    def confirmations(self) -> int:
        return len(self._confirmers) - 1

    def confirm(self, accuser: str) -> bool:
        """Count a confirmation; True when it is new information."""
        if self.confirmations >= self._k or accuser in self._confirmers:
            return False
        self._confirmers.add(accuser)
        return True

    def deadline(self) -> float:
        """Absolute time at which the suspect is declared dead."""
        remaining = remaining_suspicion_time(self.confirmations, self._k, 0.0, self._min, self._max)
        return self._start + remaining
