"""The engine's native hot path: built, and refusing what it cannot serve.

Its behaviour is tested end to end: every test in ``tests/e2e`` runs with it
and without it (``AXNET_FASTPATH=0``).
"""

from __future__ import annotations

import collections
import importlib
import os
from typing import Any

import pytest

from axnet.intercept._libc import buffer_sizes


def _fastpath() -> Any:
    try:
        return importlib.import_module("axnet.intercept._fastpath")
    except ImportError as exc:
        pytest.fail(
            f"the native hot path was not built ({exc}); install gcc and python3-dev "
            "(./quickstart does) and reinstall axnet"
        )


def test_native_hot_path_is_built() -> None:
    fast = _fastpath()
    assert {fast.SLOW, fast.DELIVER, fast.CONNECTING} == {0, 1, 2}


def _make(**overrides: object) -> Any:
    notif, resp = buffer_sizes()
    r, w = os.pipe()
    os.close(w)
    kwargs: dict[str, object] = {
        "fd": r,
        "notif_size": notif,
        "resp_size": resp,
        "pidfds": {},
        "mems": {},
        "maps": {},
        "names": {},
        "inert": {},
        "pending": collections.defaultdict(collections.deque),
        "sources": {},
    }
    kwargs.update(overrides)
    try:
        return _fastpath().Fast(**kwargs)
    finally:
        os.close(r)


def test_refuses_structure_sizes_smaller_than_the_kernel_headers() -> None:
    with pytest.raises(ValueError, match="sizes"):
        _make(notif_size=8)


def test_refuses_caches_that_are_not_dicts() -> None:
    with pytest.raises(TypeError):
        _make(pidfds=[])


def test_refuses_an_adopter_that_cannot_be_called() -> None:
    with pytest.raises(TypeError, match="adopt"):
        _make(adopt=5)


@pytest.mark.parametrize("us", [-1, 1_000_001])
def test_refuses_a_busy_poll_budget_out_of_range(us: int) -> None:
    with pytest.raises(ValueError, match="busy_poll_us"):
        _make(busy_poll_us=us)


def test_a_fresh_one_has_nothing_parked() -> None:
    fast = _make()
    assert fast.parked == 0
    assert fast.drop_abandoned() == 0
    assert fast.counters["notifications"] == 0
    fast.close()
