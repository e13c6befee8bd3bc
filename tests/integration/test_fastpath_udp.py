"""Established UDP flows on the kernel fast path, in real namespaces: iperf3 -u both
ways through the gateway pair, its datagrams translated by the tc program (the kernel's
counters, not Python's), few lost; a datagram too big for the path on a kernel flow
still gets its frag-needed; the idle close takes the flows out of the kernel; nothing
left behind after stop.

    client --- cgw === SAL (UDP flows, protocol 17) === sgw --- server (iperf3 -s, dnsmasq)
"""
import json
import shutil
import sys

import pytest

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from tests.integration.helpers import ruleset
from tests.integration.test_fastpath import fast_path_required, finish, kernel_state, wait_for  # noqa: F401
from tests.integration.test_udp_flows_lab import ANSWER, IPERF_PORT, add_udp_services, start_dns, start_iperf

UDP_IDLE = 2            # seconds: short, so that the idle close is seen within the test

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("iperf3", "dnsmasq", "dig", "bpftool")),
                                reason="needs iperf3, dnsmasq, dig and bpftool")

# One DNS query (its answer: the flow is in the kernel of both gateways by then), then a
# datagram too big for the path once the SAL header is added, sent with DF: the sender
# learns the path MTU the client gateway names (IP_MTU of the connected socket).
TOO_BIG_PY = r'''
import socket, struct, sys, time
IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14          # <linux/in.h>
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
s.connect((sys.argv[1], 53))
s.settimeout(3)
s.send(struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x03big\x04test\x07example\x00" + struct.pack("!HH", 1, 1))
assert s.recv(2048)[:2] == struct.pack("!H", 7)
try:
    s.send(b"x" * 1470)
except OSError:
    pass
deadline = time.monotonic() + 3
while s.getsockopt(socket.IPPROTO_IP, IP_MTU) == 1500 and time.monotonic() < deadline:
    time.sleep(0.02)
print(s.getsockopt(socket.IPPROTO_IP, IP_MTU))
'''
LARGEST = {"ip": 1500 - 12, "udp": 1500 - 12 - 8}     # the IP packet that fits with our headers


def udp_kernel_flows(gws, role) -> list:
    return [f for f in gws.ctl(role, "flows") if f.get("path") == "kernel" and f["legacy"].endswith(" udp")]


def idle_closed(gws) -> int:
    return sum(gws.stats(role).get("flows_idle_closed", 0) for role in ("client", "server"))


def iperf_udp(pair, gws, *args):
    r = pair.client.run(["iperf3", "-c", VIRTUAL_ADDR, "-p", str(IPERF_PORT), "-u", "-b", "40M", "-t", "3",
                         "-l", "1200", "-J", *args], check=False, timeout=60)
    result = json.loads(r.stdout)
    assert "error" not in result, (result.get("error"), gws.log("client"))
    return result["end"]["sum"]


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_iperf3_udp_both_ways_in_the_kernel_then_the_idle_close_takes_it_out(lab, carriage):
    pair = gateway_pair(lab, wire=True)
    before = {h.name: (ruleset(h), kernel_state(h)) for h in (pair.cgw, pair.sgw)}
    gws = RunningGateways(pair, carriage=carriage, fast_path="on")
    add_udp_services(gws, pair)
    for path in gws.configs.values():          # pins nowhere: `ip netns exec` has no bpffs
        path.write_text(path.read_text().replace("[gateway]\n", '[gateway]\nbpffs = "/nonexistent"\n', 1)
                        + f"\n[timeouts]\nudp_idle = {UDP_IDLE}\n")
    start_iperf(pair)
    start_dns(pair)
    gws.start()

    sent = 0
    for direction in ([], ["-R"]):
        total = iperf_udp(pair, gws, *direction)
        assert total["packets"] > 1000 and total["lost_percent"] < 2, total
        sent += total["packets"]
    stats = {role: gws.stats(role) for role in ("client", "server")}
    for role, s in stats.items():
        assert s["fastpath"] == "on" and s["fastpath_errors"] == 0 and s.get("internal_errors", 0) == 0, s
        kernel = s["fastpath_to_sal"] + s["fastpath_from_sal"]
        python = s.get("to_sal", 0) + s.get("from_sal", 0)
        # every datagram crosses each gateway once; Python carried only the handshakes,
        # the first datagrams and iperf3's TCP control connection
        assert kernel > 0.95 * sent and python < 0.02 * sent, (role, kernel, python, sent)
        # one UDP flow per iperf3 run: the kernel's traffic kept the idle close away
        assert s["udp_flows_opened"] == 2, s
    assert udp_kernel_flows(gws, "client") and udp_kernel_flows(gws, "server"), "the last run's flow"
    # too big on a kernel flow: up to Python, which names the size that fits
    r = pair.client.run([sys.executable, "-c", TOO_BIG_PY, VIRTUAL_ADDR], check=False, timeout=30)
    assert r.returncode == 0 and r.stdout.split() == [str(LARGEST[carriage])], (r.stdout, r.stderr)
    s = gws.stats("client")
    assert s["fastpath_passed_too_big"] >= 1 and s["dropped_udp_too_big"] >= 1 and s["icmp_frag_needed_sent"] >= 1, s
    # idle: the flows end (a SAL FIN from whichever side's timer runs out first) and
    # leave the kernel
    wait_for("the idle close of the three UDP flows", lambda: idle_closed(gws) >= 3, 5 * UDP_IDLE)
    wait_for("no UDP flow in the kernel", lambda: not udp_kernel_flows(gws, "client")
             and not udp_kernel_flows(gws, "server"))
    assert all(gws.stats(role)["fastpath_flows"] == 0 for role in ("client", "server"))
    finish(pair, gws, before)


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_the_client_gateway_hosts_own_udp_is_translated_in_the_kernel(lab, carriage):
    """Processes on the client gateway's host (the client container beside the gateway
    in docker-compose): their UDP toward the virtual range goes through lo, as their TCP
    does, where the kernel translates an established flow's datagrams and queues the
    rest for Python (failing closed); a datagram to a port with no service is still
    refused at once."""
    pair = gateway_pair(lab, wire=True)
    before = {h.name: (ruleset(h), kernel_state(h)) for h in (pair.cgw, pair.sgw)}
    gws = RunningGateways(pair, carriage=carriage, fast_path="on")
    add_udp_services(gws, pair)
    for path in gws.configs.values():          # pins nowhere: `ip netns exec` has no bpffs
        path.write_text(path.read_text().replace("[gateway]\n", '[gateway]\nbpffs = "/nonexistent"\n', 1))
    start_iperf(pair)
    start_dns(pair)
    gws.start()
    r = pair.cgw.run(["iperf3", "-c", VIRTUAL_ADDR, "-p", str(IPERF_PORT), "-u", "-b", "40M", "-t", "3",
                      "-l", "1200", "-J"], check=False, timeout=60)
    result = json.loads(r.stdout)
    assert "error" not in result, (result.get("error"), gws.log("client"))
    total = result["end"]["sum"]
    assert total["packets"] > 1000 and total["lost_percent"] < 2, total
    dig = pair.cgw.run(["dig", f"@{VIRTUAL_ADDR}", "+short", "+tries=1", "+time=2", "own.test.example"],
                       check=False, timeout=10)
    assert dig.stdout.split() == [ANSWER], (dig.stdout, dig.stderr)
    refused = pair.cgw.run(["dig", f"@{VIRTUAL_ADDR}", "-p", "5999", "+tries=1", "+time=2", "x.test.example"],
                           check=False, timeout=10)
    assert "connection refused" in refused.stdout + refused.stderr, refused.stdout
    s = gws.stats("client")
    assert s["fastpath_errors"] == 0 and s.get("internal_errors", 0) == 0, s
    # the handshakes, the first datagrams and iperf3's control connection are Python's
    assert s["fastpath_to_sal"] > 0.95 * total["packets"], s
    assert s.get("to_sal", 0) < 0.02 * total["packets"], s
    finish(pair, gws, before)
