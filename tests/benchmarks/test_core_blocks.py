"""How the core benchmark pairs redis runs, and how sure a median of them is."""

from __future__ import annotations

import contextlib
import random
import statistics
from collections.abc import Callable, Iterator

from bench.core import (
    PLACEMENTS,
    Program,
    _ratios,
    block_runs,
    median_interval,
    selected_roundtrips,
)


def test_each_block_serves_afresh_and_alternates_its_runs() -> None:
    log: list[str] = []

    def side(name: str) -> Callable[[int], contextlib.AbstractContextManager[Callable[[], float]]]:
        @contextlib.contextmanager
        def serve(port: int) -> Iterator[Callable[[], float]]:
            def run() -> float:
                log.append(f"run {name}")
                return float(port)

            log.append(f"start {name} {port}")
            yield run
            log.append(f"stop {name}")

        return serve

    samples = block_runs(2, 2, {"a": side("a"), "b": side("b")}, first_port=100)
    assert log == [
        "start a 100", "start b 101",
        "run a", "run b", "run b", "run a",
        "stop b", "stop a",
        "start a 102", "start b 103",
        "run a", "run b", "run b", "run a",
        "stop b", "stop a",
    ]  # fmt: skip
    assert samples == {"a": [100.0, 100.0, 102.0, 102.0], "b": [101.0, 101.0, 103.0, 103.0]}


def test_a_blocks_servers_stop_when_a_run_fails() -> None:
    stopped: list[int] = []

    @contextlib.contextmanager
    def serve(port: int) -> Iterator[Callable[[], float]]:
        try:
            yield lambda: 1 / 0
        finally:
            stopped.append(port)

    with contextlib.suppress(ZeroDivisionError):
        block_runs(3, 2, {"a": serve, "b": serve}, first_port=7)
    assert stopped == [8, 7]


def test_the_median_interval_holds_the_true_median_about_95_times_in_100() -> None:
    rng = random.Random(5)
    held = 0
    for _ in range(1000):
        low, high = median_interval([rng.gauss(1.0, 0.11) for _ in range(80)])
        held += low <= 1.0 <= high
    assert 930 <= held <= 985  # order statistics err wide: 970 here


def test_the_median_interval_of_a_few_values_is_all_of_them() -> None:
    values = [3.0, 1.0, 2.0]
    assert median_interval(values) == (1.0, 3.0)
    assert statistics.median(values) == 2.0


def test_each_run_is_divided_by_the_baseline_run_beside_it() -> None:
    # Each axnet run is 0.96 of the native run beside it, while native runs
    # swing by a factor of two: a ratio of two medians would say 1.0 or 0.5.
    native = [100.0, 200.0, 100.0, 200.0, 200.0]
    samples = {"native": native, "axnet": [0.96 * n for n in native]}
    out = _ratios(
        samples, axnet=("axnet", "native"), pinned_axnet=("axnet_pinned", "native_pinned")
    )
    assert out["axnet_over_native"] == 0.96
    assert out["axnet_over_native_interval"] == (0.96, 0.96)
    assert out["pinned_axnet_over_native"] is None
    assert out["pinned_axnet_over_native_interval"] is None


def test_round_trips_run_only_the_apps_and_placements_asked_for() -> None:
    programs = {
        "python": Program(["p"], ["p"], PLACEMENTS),
        "c": Program(["c"], ["c"], PLACEMENTS),
        "python-fd": Program(["f"], ["f"], ("free",)),
    }
    assert selected_roundtrips(programs, None, None) == [
        (lang, placement) for lang in ("python", "c") for placement in PLACEMENTS
    ] + [("python-fd", "free")]
    assert selected_roundtrips(programs, ["python-fd", "python"], ["free"]) == [
        ("python", "free"),
        ("python-fd", "free"),
    ]
    assert selected_roundtrips(programs, ["python-fd"], ["one_cpu"]) == []
