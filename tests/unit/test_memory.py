"""Memory per flow: 100,000 established flows in a client and a server translator.

Each flow is opened as the daemons open one (legacy SYN through the client's
from_legacy, the SAL SYN through the server's from_sal, the backend's SYN-ACK, the SAL
SYN|ACK back, the legacy ACK and the SAL ACK), so each side holds what a real
established flow holds; bench/memory.py counts each side's share with tracemalloc.

The bound, 3 KB per flow per side: measured here (CPython 3.11, 64-bit) about 1.3 KB
for the client and 1.4 KB for the server: the Flow object itself (33 slots, ~300 B),
its SalFlow (~160 B), a dozen 4-byte addresses, 12-byte SAL headers, nonce and boxed
ints (checksum deltas, IP header sums, counters: 28-45 B each), the table, heap and
key entries. 3 KB leaves about twice that for interpreter differences while still
catching a per-flow leak (a held packet is ~1.5 KB, a retained Outstanding or SAL
header object several hundred bytes) or a table that keeps forgotten flows. At 3 KB,
the default cap of 262,144 flows stays under 800 MB per side.
"""
import pytest

from bench.memory import measure

FLOWS = 100_000
BOUND = 3 * 1024


@pytest.fixture(scope="module")
def measured():
    return measure(FLOWS)


def test_every_flow_is_established_on_both_sides(measured):
    assert measured["established"] == [FLOWS + 4, FLOWS + 4]


@pytest.mark.parametrize("side", ["client", "server"])
def test_bytes_per_flow_bounded(measured, side):
    per_flow = measured[side]
    print(f"{side}: {per_flow:.0f} bytes per established flow")
    assert 200 < per_flow < BOUND, f"{side}: {per_flow:.0f} B per flow (bound {BOUND})"
