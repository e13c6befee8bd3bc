"""One UDP 5-tuple's flow across a kill -9 and restart of either gateway, and across a
new address of the client gateway, for real:

    client --- cgw (client gateway) === SAL (protocol 17) === sgw --- server (dnsmasq)

The client sends a steady stream of DNS queries from one connected UDP socket (one
5-tuple, so one SAL flow; dig would open a socket per query), each answered by dnsmasq
behind the server gateway. After the restart (its flows taken back from the snapshot)
or the move (RSYN, RSYN|ACK, ACK), the queries go on on the same SAL flow: no second
flow is opened on either side, the flowIDs are the same, and only queries sent while a
gateway was down (or in flight at the move) go unanswered.
"""
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from tests.integration.test_udp_flows_lab import ANSWER, add_udp_services, start_dns

pytestmark = pytest.mark.skipif(not (shutil.which("dnsmasq") and shutil.which("dig")),
                                reason="needs dnsmasq and dig")

# A DNS client on one connected UDP socket: a query every INTERVAL s until the stop file
# exists, then a last wait for answers; prints "A <id>" for each right answer (id
# matches, QR set, NOERROR, the address dnsmasq gives) and "S <last id sent>" at the end.
STREAM = r"""
import os, select, socket, struct, sys, time
addr, interval, stop, answer = sys.argv[1], float(sys.argv[2]), sys.argv[3], socket.inet_aton(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((addr, 53))
def query(n):
    name = b"".join(bytes([len(p)]) + p for p in (b"q%d" % n, b"test", b"example")) + b"\0"
    return struct.pack("!HHHHHH", n, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
n, next_at, end = 0, time.monotonic(), None
while end is None or time.monotonic() < end:
    now = time.monotonic()
    if end is None and os.path.exists(stop):
        end = now + 1.0
    if end is None and now >= next_at:
        n += 1
        s.send(query(n))
        next_at += interval
    wait = max(0.0, (next_at if end is None else end) - time.monotonic())
    if select.select([s], [], [], wait)[0]:
        try:
            data = s.recv(2048)
        except ConnectionRefusedError:
            print("E refused", flush=True)
            continue
        ident, flags, _, ancount = struct.unpack_from("!HHHH", data)
        if flags & 0x8000 and flags & 0xF == 0 and ancount and data.endswith(answer):
            print("A", ident, flush=True)
print("S", n, flush=True)
"""
INTERVAL = 0.02


class QueryStream:
    """The DNS client above, run on the legacy client; what it has seen so far."""

    def __init__(self, pair, tmp_path):
        self.out, self.stop_file = tmp_path / "stream.out", tmp_path / "stream.stop"
        self.proc = pair.client.popen([sys.executable, "-c", STREAM, VIRTUAL_ADDR, str(INTERVAL),
                                       str(self.stop_file), ANSWER], stdout=open(self.out, "w"))

    def answered(self) -> set[int]:
        return {int(line.split()[1]) for line in self.out.read_text().splitlines() if line.startswith("A ")}

    def wait_answers(self, more: int, since: set[int] | None = None, timeout: float = 20.0) -> set[int]:
        """Until ``more`` answers beyond ``since`` have come."""
        base = len(since or ())
        deadline = time.monotonic() + timeout
        while len(got := self.answered()) < base + more:
            assert self.proc.poll() is None, self.out.read_text()[-2000:]
            assert time.monotonic() < deadline, f"{len(got) - base} of {more} answers: {self.out.read_text()[-500:]}"
            time.sleep(0.05)
        return got

    def finish(self) -> tuple[int, set[int]]:
        """Stop it: (the last query id sent, the ids answered)."""
        self.stop_file.touch()
        self.proc.wait(10)
        lines = self.out.read_text().splitlines()
        assert lines and lines[-1].startswith("S "), lines[-5:]
        return int(lines[-1].split()[1]), self.answered()


def unanswered_runs(sent: int, answered: set[int]) -> list[range]:
    """The queries left unanswered, as runs of consecutive ids."""
    runs, start = [], None
    for i in range(1, sent + 2):
        if i not in answered and i <= sent:
            start = i if start is None else start
        elif start is not None:
            runs.append(range(start, i))
            start = None
    return runs


def udp_flows(gws, role) -> list[dict]:
    return [f for f in gws.ctl(role, "flows") if f["legacy"].endswith(" udp")]


def wait_udp_snapshot(gws, role: str, since: float, timeout: float = 10.0) -> None:
    """Until the gateway has written its snapshot with the UDP flow in it, after ``since``."""
    host = gws.hosts[role]
    netns = host.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout.strip()
    path = f"/run/serval/{role}.net{netns}.flows.json"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.path.getmtime(path) > since and json.loads(Path(path).read_text()).get("udp_flows"):
                return
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline, f"no snapshot with a UDP flow at {path}"
        time.sleep(0.05)


@pytest.fixture
def running(lab):
    pair = gateway_pair(lab, wire=True)
    for gw in (pair.cgw, pair.sgw):
        gw.sysctl("net.ipv4.conf.all.promote_secondaries", 1)   # replacing an address keeps the subnet
    gws = RunningGateways(pair)
    add_udp_services(gws, pair)
    start_dns(pair)
    gws.start()
    yield pair, gws
    codes = gws.stop()
    assert codes == {"client": 0, "server": 0}, (gws.log("client"), gws.log("server"))


@pytest.mark.parametrize("killed", ["client", "server"])
def test_a_udp_flow_goes_on_across_kill_9_and_restart(running, tmp_path, killed):
    pair, gws = running
    started = time.time()
    stream = QueryStream(pair, tmp_path)
    stream.wait_answers(20)
    other = "server" if killed == "client" else "client"
    (before,) = udp_flows(gws, killed)
    assert udp_flows(gws, other)[0]["remote_flow"] == before["local_flow"]
    wait_udp_snapshot(gws, killed, started)
    gws.signal(killed, signal.SIGKILL)
    gws.procs[killed].wait(5)
    answered_at_kill = stream.answered()
    gws.launch(killed)
    assert "resumed 1 established flow" in gws.log(killed), gws.log(killed)
    stream.wait_answers(50, since=stream.answered())
    sent, answered = stream.finish()
    # the same SAL flow on both sides, and no other was opened
    (after,) = udp_flows(gws, killed)
    assert (after["local_flow"], after["remote_flow"]) == (before["local_flow"], before["remote_flow"])
    assert [f["remote_flow"] for f in udp_flows(gws, other)] == [before["local_flow"]]
    restarted, stayed = gws.stats(killed), gws.stats(other)
    assert restarted.get("udp_flows_opened", 0) == 0 and restarted["flows_resumed"] == 1, restarted
    assert stayed["udp_flows_opened"] == 1, stayed
    assert stayed.get("flows_reset", 0) == 0 and restarted.get("flows_reset", 0) == 0
    # queries went unanswered only while the gateway was down: one run of them
    runs = unanswered_runs(sent, answered)
    assert len(runs) <= 1, runs
    assert all(r.start > max(answered_at_kill) - 2 for r in runs), (runs, max(answered_at_kill))
    print(f"{killed} gateway restarted: {sum(map(len, runs))} of {sent} queries unanswered (sent while it was down)")


def test_a_udp_flow_goes_on_across_a_new_client_gateway_address(running, tmp_path):
    pair, gws = running
    stream = QueryStream(pair, tmp_path)
    stream.wait_answers(20)
    (before,) = udp_flows(gws, "server")
    new = "198.19.2.11"
    pair.cgw.run(["ip", "addr", "add", f"{new}/24", "dev", pair.cgw_sal_if])
    pair.cgw.run(["ip", "addr", "del", f"{pair.cgw_sal}/24", "dev", pair.cgw_sal_if])
    deadline = time.monotonic() + 10
    while gws.stats("server").get("peer_migrations_completed", 0) < 1:
        assert time.monotonic() < deadline, (gws.stats("client"), gws.stats("server"))
        time.sleep(0.05)
    stream.wait_answers(50, since=stream.answered())
    sent, answered = stream.finish()
    client, server = gws.stats("client"), gws.stats("server")
    assert client["migrations_completed"] == 1 and server["peer_migrations_completed"] == 1, (client, server)
    assert client["udp_flows_opened"] == server["udp_flows_opened"] == 1, (client, server)
    assert client.get("flows_reset", 0) == 0 and server.get("flows_reset", 0) == 0
    (after,) = udp_flows(gws, "server")
    assert (after["local_flow"], after["remote_flow"]) == (before["local_flow"], before["remote_flow"])
    assert after["peer"] == new
    # held while the move was unconfirmed, then sent on: at most the queries (or their
    # answers) in flight when the old address went are lost
    lost = sum(map(len, unanswered_runs(sent, answered)))
    assert lost <= 2, (lost, sent, unanswered_runs(sent, answered))
    print(f"moved: {lost} of {sent} queries unanswered; migration {client.get('migration_ms_last')} ms")
