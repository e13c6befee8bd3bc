"""Shared fixtures: `lab` (a torn-down-always Lab) and `pair` (gateway_pair)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Let `pytest` work from a checkout that was not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        return "`ip netns` is unavailable"
    return None


def pytest_collection_modifyitems(config, items):
    # Everything under tests/integration carries the `integration` marker,
    # so `-m "not integration"` selects the unit tests.
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def requires_netns():
    """Skip (with the reason) where namespaces cannot be built."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def lab(requires_netns):
    from lab.topology import Lab

    the_lab = Lab()
    try:
        yield the_lab
    finally:
        the_lab.teardown()


@pytest.fixture
def pair(lab):
    from lab.topologies import gateway_pair

    return gateway_pair(lab)
