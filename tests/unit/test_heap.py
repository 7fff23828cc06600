"""The heap settler: a large table leaves the collector's walk, and still frees what it replaces."""

from __future__ import annotations

import gc
import ipaddress
import weakref
from collections.abc import Iterator

import pytest

from axnet._heap import Settler
from axnet._table import RealAddress, ServiceRecord, ServiceTable, VirtualAddress


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def service(i: int, version: int = 1) -> ServiceRecord:
    vip = ipaddress.ip_address(int(ipaddress.ip_address("10.0.0.0")) + i)
    return ServiceRecord(
        virtual=VirtualAddress(ip=vip, port=80),
        real=RealAddress(host=ipaddress.ip_address("192.0.2.9"), port=20000 + i % 1000),
        node="n2",
        app_id=f"a{i}",
        version=version,
    )


def walked() -> set[int]:
    """Ids of the objects a full collection walks."""
    return {id(o) for o in gc.get_objects()}


def test_records_stay_in_the_walk_until_enough_came_in() -> None:
    settler, table = Settler(min_records=100), ServiceTable()
    for i in range(99):
        table.merge(service(i))
    assert not settler.merged(99, len(table))
    assert gc.get_freeze_count() == 0
    assert id(table.services[service(0).virtual]) in walked()


def test_a_grown_table_leaves_the_walk_and_what_it_replaces_is_still_freed() -> None:
    settler, table = Settler(min_records=100), ServiceTable()
    for i in range(100):
        table.merge(service(i))
    assert settler.merged(100, len(table))
    now = walked()
    assert not any(id(r) in now for r in table.services.values())
    old = weakref.ref(table.services[service(7).virtual])
    table.merge(service(7, version=2))
    assert old() is None  # reference counting frees a frozen record


def test_a_freeze_comes_once_a_quarter_of_the_table_came_in() -> None:
    settler = Settler(min_records=100)
    assert settler.merged(1000, 1000)
    assert not settler.merged(200, 1000)  # churn: 200 of 1000 replaced
    assert not settler.merged(49, 1000)
    assert settler.merged(1, 1000)
    assert not settler.merged(99, 100)  # never below the minimum
    assert settler.merged(1, 100)
