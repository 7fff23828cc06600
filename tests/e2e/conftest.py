"""An axnet node on a fresh test host, everything run as ``nobody``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from axnet.intercept._probe import probe_user_notification
from axnet.testing import AxnetNode, NetnsHost


@pytest.fixture
def node(netns_host: NetnsHost) -> Iterator[AxnetNode]:
    reason = probe_user_notification()
    if reason is not None:
        pytest.skip(reason)
    axnet = AxnetNode(netns_host).start()
    try:
        yield axnet
    finally:
        print(axnet.all_logs())  # shown by pytest when the test failed
        axnet.close()
