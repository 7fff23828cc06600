"""The core benchmark's summary judges each ratio where it was measured."""

from __future__ import annotations

from typing import Any

from bench.core import summary


def _part(native: float, axnet: float, pinned: tuple[float, float] | None) -> dict[str, Any]:
    sides = {"native": native, "axnet": axnet}
    if pinned is not None:
        sides |= {"native_pinned": pinned[0], "axnet_pinned": pinned[1]}
    return {
        "sides": sides,
        "axnet_over_native": axnet / native,
        "pinned_axnet_over_native": pinned[1] / pinned[0] if pinned else None,
    }


def _results(pinned: tuple[float, float] | None) -> dict[str, Any]:
    tp = _part(20.0, 19.8, pinned)
    rd = _part(160000.0, 144000.0, (150000.0, 149000.0) if pinned else None)
    return {
        "throughput": {
            "gbit_s": tp.pop("sides") | {"haproxy": 8.0},
            "haproxy_over_native": 0.4,
            **tp,
        },
        "redis": {
            "rps_set_plus_get": rd.pop("sides"),
            "axnet_over_native_interval": (0.85, 0.93),
            **rd,
        },
    }


def _row(text: str, measure: str) -> str:
    (row,) = [line for line in text.splitlines() if line.startswith(f"| {measure} |")]
    return row


def test_free_and_pinned_pairs_are_each_judged_against_the_target() -> None:
    text = summary(_results(pinned=(21.0, 18.9)))
    assert _row(text, "iperf3 throughput").endswith("| ×0.990 | ≥ 0.95 ✓ |")
    assert _row(text, "iperf3 throughput, server and client on separate CPUs") == (
        "| iperf3 throughput, server and client on separate CPUs | 21.00 Gbit/s "
        "| 18.90 Gbit/s | ×0.900 | ≥ 0.95 ✗ |"
    )
    assert _row(text, "redis-benchmark SET+GET rps") == (
        "| redis-benchmark SET+GET rps | 160000 | 144000 | ×0.900 (95 %: 0.850 to 0.930) "
        "| ≥ 0.95 ✗ |"
    )
    assert _row(
        text, "redis-benchmark SET+GET rps, server and benchmark on separate CPUs"
    ).endswith("| 150000 | 149000 | ×0.993 | ≥ 0.95 ✓ |")
    assert _row(text, "iperf3 via HAProxy (sidecar)").endswith("| ×0.400 | baseline |")


def test_a_machine_that_cannot_pin_shows_only_the_free_rows() -> None:
    text = summary(_results(pinned=None))
    assert "separate CPUs" not in text
    assert _row(text, "redis-benchmark SET+GET rps").endswith(
        "| ×0.900 (95 %: 0.850 to 0.930) | ≥ 0.95 ✗ |"
    )


def _roundtrips(lang: str, placement: str, added: float, cpu: float) -> dict[str, Any]:
    return {
        "lang": lang,
        "placement": placement,
        "native_us": {"p50": 75.0, "p99": 150.0},
        "axnet_us": {"p50": 75.0 + added, "p99": 240.0},
        "added_us": {"p50": added, "p99": 90.0},
        "ratio_p50": (75.0 + added) / 75.0,
        "added_p50_by_block_us": [added - 5, added + 5],
        "server_supervisor_cpu_us": cpu,
    }


def test_round_trips_are_judged_where_placed_freely_with_the_supervisors_cpu() -> None:
    text = summary(
        {
            "roundtrips": {
                "c/free": _roundtrips("c", "free", 50.0, 61.5),
                "c/one_cpu": _roundtrips("c", "one_cpu", 90.0, 40.0),
                "c-no-busy-poll/free": _roundtrips("c-no-busy-poll", "free", 66.0, 35.25),
            }
        }
    )
    assert _row(text, "connect+accept+close p50 (c apps, free)") == (
        "| connect+accept+close p50 (c apps, free) | 75.0 µs | 125.0 µs | +50.0 µs (×1.67) "
        "| ≤ 60 µs added ✓ (blocks: 2 of 2 within, +45 to +55) |"
    )
    assert _row(text, "connect+accept+close p50 (c apps, one CPU)").endswith("| — |")
    assert "≤ 60 µs added ✗ (blocks: 0 of 2 within" in _row(
        text, "connect+accept+close p50 (c apps, --busy-poll 0, free)"
    )
    assert _row(text, "c apps, free") == "| c apps, free | 61.5 µs |"
    assert _row(text, "c apps, --busy-poll 0, free") == "| c apps, --busy-poll 0, free | 35.2 µs |"


def test_untrapped_calls_show_what_a_filter_adds_to_each() -> None:
    price = {
        "native": {"getppid_ns": 207.0, "pipe_write_read_ns": 820.0},
        "axnet": {"getppid_ns": 352.0, "pipe_write_read_ns": 1250.0},
        "axnet_added": {"getppid_ns": 140.0, "pipe_write_read_ns": 425.0},
        "seccomp_only_added": {"getppid_ns": 143.0, "pipe_write_read_ns": 420.0},
    }
    text = summary({"syscall_price": price})
    assert _row(text, "getppid, untrapped") == (
        "| getppid, untrapped | 207 ns | 352 ns | +140 ns | a filter that traps nothing: +143 ns |"
    )
    assert _row(text, "write+read on a pipe, untrapped").endswith(
        "| +425 ns | a filter that traps nothing: +420 ns |"
    )
