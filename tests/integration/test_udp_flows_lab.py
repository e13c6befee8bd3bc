"""UDP services through the gateway pair for real: unmodified programs in namespaces.

    client --- cgw (client gateway) === SAL (protocol 17 flows) === sgw --- server

The server runs a real DNS server (dnsmasq, on 5300) and iperf3 (TCP control and UDP
data on 5201); the client reaches both only through the virtual address: ``dig`` over
UDP (every query a new socket, so a new SAL flow), and ``iperf3 -u`` at a fixed rate
(both ways) with iperf3's own loss report. A UDP service whose backend has nothing listening
refuses dig at once. With the fast path (the default) established UDP flows are the
kernel's; tests/integration/test_fastpath_udp.py checks who translated what.
"""
import json
import shutil
import subprocess
import time

import pytest

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair

DNS_PORT, IPERF_PORT = 5300, 5201
NOBODY_PORT = 5399                 # a UDP service whose backend has nothing listening
ANSWER = "198.19.9.9"
QUERIES = 200

pytestmark = pytest.mark.skipif(not (shutil.which("dnsmasq") and shutil.which("dig") and shutil.which("iperf3")),
                                reason="needs dnsmasq, dig and iperf3")


def add_udp_services(gws: RunningGateways, pair) -> None:
    """DNS over UDP, and iperf3 (its TCP control connection and its UDP data) on one
    virtual address:port, appended to the configs the lab wrote."""
    client = gws.configs["client"]
    client.write_text(client.read_text() + f'''
[[service]]
name = "dns.svc.example"
address = "{VIRTUAL_ADDR}"
port = 53
protocol = "udp"

[[service]]
name = "iperf.svc.example"
address = "{VIRTUAL_ADDR}"
port = {IPERF_PORT}

[[service]]
name = "iperf.svc.example"
address = "{VIRTUAL_ADDR}"
port = {IPERF_PORT}
protocol = "udp"

[[service]]
name = "nobody.svc.example"
address = "{VIRTUAL_ADDR}"
port = 54
protocol = "udp"

[[route]]
service = "dns.svc.example"
next_hop = "{pair.sgw_sal}"

[[route]]
service = "nobody.svc.example"
next_hop = "{pair.sgw_sal}"

[[route]]
service = "iperf.svc.example"
next_hop = "{pair.sgw_sal}"
''')
    server = gws.configs["server"]
    server.write_text(server.read_text() + f'''
[[service]]
name = "dns.svc.example"
port = 53
protocol = "udp"
backend = "{pair.server_addr}:{DNS_PORT}"

[[service]]
name = "nobody.svc.example"
port = 54
protocol = "udp"
backend = "{pair.server_addr}:{NOBODY_PORT}"

[[service]]
name = "iperf.svc.example"
port = {IPERF_PORT}
backend = "{pair.server_addr}:{IPERF_PORT}"

[[service]]
name = "iperf.svc.example"
port = {IPERF_PORT}
protocol = "udp"
backend = "{pair.server_addr}:{IPERF_PORT}"
''')


def start_dns(pair) -> None:
    pair.server.popen(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", f"--port={DNS_PORT}",
                       f"--listen-address={pair.server_addr}", "--bind-interfaces", "--no-resolv",
                       "--no-hosts", "--pid-file=", "--user=root", f"--address=/test.example/{ANSWER}"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:                        # asked directly, in its own namespace
        r = pair.server.run(["dig", f"@{pair.server_addr}", "-p", str(DNS_PORT), "+short", "+tries=1",
                             "+time=1", "up.test.example"], check=False)
        if r.stdout.split() == [ANSWER]:
            return
        assert time.monotonic() < deadline, f"dnsmasq did not answer: {r.stdout} {r.stderr}"


def start_iperf(pair) -> None:
    proc = pair.server.popen(["iperf3", "-s", "-p", str(IPERF_PORT)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while pair.server.run(["ss", "-Htln", f"sport = :{IPERF_PORT}"], check=False).stdout.strip() == "":
        assert proc.poll() is None and time.monotonic() < deadline, "iperf3 -s did not start"
        time.sleep(0.05)


@pytest.fixture(params=["ip", "udp"])
def running(request, lab):
    pair = gateway_pair(lab, wire=True)
    gws = RunningGateways(pair, carriage=request.param)
    add_udp_services(gws, pair)
    start_dns(pair)
    start_iperf(pair)
    gws.start()
    yield pair, gws
    codes = gws.stop()
    assert codes == {"client": 0, "server": 0}, (gws.log("client"), gws.log("server"))


def test_dig_over_udp_many_queries_all_answered(running, tmp_path):
    pair, gws = running
    batch = tmp_path / "queries"
    batch.write_text("".join(f"q{i}.test.example A\n" for i in range(QUERIES)))
    r = pair.client.run(["dig", f"@{VIRTUAL_ADDR}", "-p", "53", "+short", "+tries=2", "+time=3",
                         "-f", str(batch)], check=False, timeout=300)
    answers = r.stdout.split("\n")
    assert answers.count(ANSWER) == QUERIES, (r.stdout[-2000:], r.stderr[-2000:], gws.stats("client"))
    cstats, sstats = gws.stats("client"), gws.stats("server")
    # each dig query is its own socket (a source port dig may happen to use again rides
    # the flow still open on it): SAL flows opened through both gateways alike
    assert cstats["udp_flows_opened"] == sstats["udp_flows_opened"] > QUERIES // 2, (cstats, sstats)
    assert cstats.get("dropped_udp_not_carried", 0) == 0


def test_a_backend_with_nothing_listening_refuses_dig_at_once(running):
    """The backend's kernel answers port unreachable; the client's dig hears connection
    refused (not a timeout): its one try ends with the refusal."""
    pair, gws = running
    r = pair.client.run(["dig", f"@{VIRTUAL_ADDR}", "-p", "54", "+tries=1", "+time=20", "x.test.example"],
                        check=False, timeout=60)
    assert "connection refused" in r.stdout + r.stderr, (r.stdout, r.stderr, gws.stats("server"))
    assert gws.stats("server")["icmp_udp_backend_refused"] >= 1


@pytest.mark.parametrize("direction", [[], ["-R"]], ids=["to_server", "from_server"])
def test_iperf3_udp_at_a_fixed_rate_loses_little(running, direction):
    pair, gws = running
    r = pair.client.run(["iperf3", "-c", VIRTUAL_ADDR, "-p", str(IPERF_PORT), "-u", "-b", "20M", "-t", "3",
                         "-J", *direction], check=False, timeout=60)
    result = json.loads(r.stdout)
    assert "error" not in result, (result.get("error"), gws.log("client"))
    total = result["end"]["sum"]
    assert total["packets"] > 0
    assert total["lost_percent"] < 5, total
    stats = gws.stats("server")
    assert stats["udp_flows_opened"] >= 1 and stats.get("dropped_wrong_protocol", 0) == 0
