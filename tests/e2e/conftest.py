"""An axnet node on a fresh test host, everything run as ``nobody``.

Every test runs twice: with the engine's native hot path answering first
(what users get), and with ``AXNET_FASTPATH=0`` (the Python engine alone,
what a build without a C compiler gets).  Both must behave the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from axnet.intercept._probe import probe_user_notification
from axnet.testing import AxnetNode, NetnsHost


@pytest.fixture(params=["native", "python"])
def node(netns_host: NetnsHost, request: pytest.FixtureRequest) -> Iterator[AxnetNode]:
    reason = probe_user_notification()
    if reason is not None:
        pytest.skip(reason)
    axnet = AxnetNode(netns_host)
    if request.param == "python":
        axnet.env["AXNET_FASTPATH"] = "0"
    axnet.start()
    try:
        yield axnet
    finally:
        print(axnet.all_logs())  # shown by pytest when the test failed
        axnet.close()
