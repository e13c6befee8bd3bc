"""Benchmarks of the gateway pair in lab namespaces: ``python -m bench.run``."""
