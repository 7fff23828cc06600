"""``python -m bench`` (``nox -s bench``): every benchmark, then one summary.

Each benchmark runs its baseline and axnet side by side in one run and writes
``bench/results/NAME.json`` and ``NAME.md``; this collects the markdown into
``bench/results/SUMMARY.md``.  Namespace benchmarks need root (they build
test hosts); what they measure runs as ``nobody``.

    python -m bench [--quick] [--only core,attach,sim,serf] [--out bench/results]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import attach, cluster_vs_serf, core, sim_convergence, unwind_on_sigterm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    parser.add_argument("--only", default="core,attach,sim,serf", help="comma-separated subset")
    args = parser.parse_args(argv)
    unwind_on_sigterm()
    wanted = set(args.only.split(","))
    out = str(args.out)
    failures = 0
    if "core" in wanted:
        failures += core.main(["--out", out, *(["--quick"] if args.quick else [])]) != 0
    if "attach" in wanted:
        count = ["--peers", "2", "--count", "20"] if args.quick else []
        failures += attach.main([*count, "--out", out]) != 0
    if "sim" in wanted:
        sizes = "10,100,1000" if args.quick else "10,100,1000,10000"
        sim_convergence.main(["--sizes", sizes, "--out", out])
    if "serf" in wanted:
        nodes = ["--nodes", "8"] if args.quick else ["--nodes", "8", "--nodes", "32"]
        failures += cluster_vs_serf.main([*nodes, "--out", out]) != 0
    parts = []
    for name in ("core", "attach", "sim_convergence", "cluster_vs_serf"):
        path = args.out / f"{name}.md"
        if path.exists():
            parts.append(path.read_text())
    (args.out / "SUMMARY.md").write_text("\n\n".join(parts))
    print(f"bench: summary in {args.out / 'SUMMARY.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
