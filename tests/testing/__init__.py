"""Tests of axnet.testing: the test hosts themselves."""
