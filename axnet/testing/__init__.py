"""Test doubles and test-host builders that tests and benchmarks share."""
