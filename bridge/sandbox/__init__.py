"""Simulators of the platforms, as real HTTP servers on loopback.

Used by the tests, `bridge demo` and the benchmarks. Each simulator follows the platform's
documentation (see docs/simulators.md for what is modelled and what is not).
"""
