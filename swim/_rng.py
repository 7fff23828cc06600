"""The randomness a core needs, as a structural type.

Cores never import `random`: the driver passes an object with these three
methods (`random.Random` satisfies it; tests pass `random.Random(seed)`), so a
simulation is reproducible from one seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Rng(Protocol):
    """A source of uniform randomness."""

    def random(self) -> float:
        """A float uniformly drawn from [0, 1)."""
        ...

    def shuffle(self, x: list[Any], /) -> None:
        """Shuffle `x` in place."""
        ...

    def sample(self, population: Sequence[T], k: int) -> list[T]:
        """`k` distinct elements of `population`."""
        ...
