"""Cluster CA, certificates and the TLS upgrade (not yet built)."""
