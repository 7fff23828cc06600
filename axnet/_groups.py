"""Finding what went wrong inside trio's exception groups (pure)."""

from __future__ import annotations


def first_of(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """*exc* itself, or the first exception of *kinds* inside its groups; else None."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := first_of(inner, kinds)) is not None:
                return found
    return None
