"""When parked calls are checked (``_parked.next_check``)."""

from __future__ import annotations

import pytest

from axnet.intercept._parked import CHECK_SPACING, WAIT_SLICE_S, next_check


def test_a_quick_check_comes_back_every_slice() -> None:
    assert next_check(100.0, 100.001) == pytest.approx(100.0 + WAIT_SLICE_S)


def test_a_long_check_takes_at_most_its_share_of_the_engines_time() -> None:
    # 2000 parked threads: a check took 0.3 s, and with a 0.2 s slice the next
    # one was due before it ended, so one ran after every notification.
    assert next_check(100.0, 100.3) == pytest.approx(100.0 + CHECK_SPACING * 0.3)
