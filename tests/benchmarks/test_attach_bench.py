"""The app-start benchmark runs, and reports what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from axnet.testing import can_make_netns

REPO = Path(__file__).resolve().parents[2]


def test_the_attach_benchmark_measures_a_node_alone_and_one_with_peers(
    require: Callable[[str | None], None], tmp_path: Path
) -> None:
    require(can_make_netns())
    done = subprocess.run(
        [sys.executable, "-m", "bench.attach", "--peers", "2", "--count", "5", "--out", tmp_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "attach.json").read_text())
    assert result["peers"] == 2 and result["attaches"] == 30
    for label in ("alone", "with peers"):
        assert 0 < result[label]["p50_us"] <= result[label]["p99_us"]
    assert "| p50 |" in (tmp_path / "attach.md").read_text()
