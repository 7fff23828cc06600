"""Benchmarks: native and axnet side by side, reported as ratios."""
