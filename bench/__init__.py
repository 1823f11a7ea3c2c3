"""Benchmarks of the bridge: ``python -m bench`` (see bench/README.md)."""
