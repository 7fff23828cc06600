"""Tests of the interception engine: filter, codec, bindings, launcher."""
