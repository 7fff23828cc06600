"""Interception engine: seccomp filter, notification bindings, launcher."""
