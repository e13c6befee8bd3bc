"""Network-namespace labs for the demo, integration tests and benchmarks."""

from lab.topology import Host, Lab

__all__ = ["Host", "Lab"]
