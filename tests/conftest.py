"""Fixtures for every test: test hosts, unprivileged directories, leak checks.

Nothing here writes into the checkout, so the tests run from a read-only one
(with ``-p no:cacheprovider``).  Reusable test doubles live in
``axnet.testing``, not here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from axnet.testing import (
    Cluster,
    NetnsHost,
    become_subreaper,
    can_make_netns,
    cleanup_stale,
    find_leftovers,
    has_program,
    make_hosts,
    make_runtime_dir,
    reap_zombie_children,
    remove_leftovers,
    shared_tmp,
)

# Machines here are shared and noisy: a stalled example is no failure.
settings.register_profile("axnet", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("axnet")


def _require(reason: str | None) -> None:
    __tracebackhide__ = True  # report the skip at the test's line, not here
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def require() -> Callable[[str | None], None]:
    """``require(probe())``: skip the test with the probe's reason, if it gives one."""
    return _require


@pytest.fixture(scope="session", autouse=True)
def _no_leftovers() -> Iterator[None]:
    """Fail the run loudly if a test leaves a namespace or a process behind."""
    if can_make_netns() is None:
        cleanup_stale()  # namespaces of an earlier run that crashed
    # Processes that tests start stay our descendants however they daemonize.
    become_subreaper()
    yield
    leftovers = find_leftovers()
    if leftovers:
        remove_leftovers(leftovers)
    # Adopted orphans that died are zombies until reaped; pid 1 of a container may never do it.
    reap_zombie_children()
    if leftovers:
        pytest.fail(
            f"tests left these behind (now removed):\n{leftovers.describe()}", pytrace=False
        )


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A fresh directory (mode 0755) that ``nobody`` can read, removed afterwards."""
    path = shared_tmp()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def runtime_dir(scratch_dir: Path) -> Path:
    """A directory private to ``nobody`` (0700), for ``AXNET_RUNTIME_DIR``."""
    return make_runtime_dir(scratch_dir)


def _require_hosts() -> None:
    _require(can_make_netns())
    _require(has_program("setpriv") if os.geteuid() == 0 else None)


@pytest.fixture
def netns_host() -> Iterator[NetnsHost]:
    """One test host: only ``lo``, no route at all."""
    _require_hosts()
    with NetnsHost.create() as host:
        yield host


@pytest.fixture
def cluster() -> Iterator[Callable[[int], Cluster]]:
    """``cluster(n)``: n hosts on one bridge, closed after the test."""
    _require_hosts()
    _require(has_program("nft"))
    made: list[Cluster] = []

    def make(n: int) -> Cluster:
        made.append(make_hosts(n))
        return made[-1]

    yield make
    errors: list[Exception] = []
    for each in made:
        try:
            each.close()
        except Exception as exc:  # close the others before reporting
            errors.append(exc)
    if errors:
        raise errors[0]
