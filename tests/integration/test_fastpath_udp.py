"""Established UDP flows on the kernel fast path, in real namespaces: iperf3 -u both
ways through the gateway pair, its datagrams translated by the tc program (the kernel's
counters, not Python's), few lost; the idle close takes the flows out of the kernel;
nothing left behind after stop.

    client --- cgw === SAL (UDP flows, protocol 17) === sgw --- server (iperf3 -s)
"""
import json
import shutil
import subprocess

import pytest

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from tests.integration.helpers import ruleset
from tests.integration.test_fastpath import fast_path_required, finish, kernel_state, wait_for  # noqa: F401
from tests.integration.test_udp_flows_lab import IPERF_PORT, add_udp_services, start_iperf

UDP_IDLE = 2            # seconds: short, so that the idle close is seen within the test

pytestmark = pytest.mark.skipif(not (shutil.which("iperf3") and shutil.which("bpftool")),
                                reason="needs iperf3 and bpftool")


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
    # idle: the flows end (a SAL FIN from whichever side's timer runs out first) and
    # leave the kernel
    wait_for("the idle close of both UDP flows", lambda: idle_closed(gws) >= 2, 5 * UDP_IDLE)
    wait_for("no UDP flow in the kernel", lambda: not udp_kernel_flows(gws, "client")
             and not udp_kernel_flows(gws, "server"))
    assert all(gws.stats(role)["fastpath_flows"] == 0 for role in ("client", "server"))
    finish(pair, gws, before)
