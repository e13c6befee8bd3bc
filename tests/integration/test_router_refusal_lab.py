"""Every replica of a service is gone: a router answers the SYN at once with an ICMP host
unreachable quoting it, over both carriages, for real (namespaces, NFQUEUE, the real
daemons, a plain socket connect() by the virtual address).

    client --- cgw ---+--- r0, r1 (service routers)
                      +--- sgw0 --- srv0   (backends killed: both instances withdrawn)
                      +--- sgw1 --- srv1
"""
import os
import subprocess
import sys

import pytest

from lab.routed import SERVICE_PORT, VIRTUAL_ADDR, Knobs, RoutedDeployment, start_backend
from lab.topologies import routed_replicas
from lab.topology import Lab
from sal import pcap, wire
from sal.ip import IPv4, aton

CONNECT = r'''
import socket, sys, time
t0 = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except OSError as exc:
    print(type(exc).__name__, round(time.monotonic() - t0, 3))
'''
COUNTER = ["-p", "icmp", "--icmp-type", "3/1", "-m", "comment", "--comment", "test-router-refusal"]


@pytest.fixture(scope="module", params=["ip", "udp"])
def gone(request):
    """A routed deployment whose every replica of the service is gone (backends killed,
    both instances withdrawn from both routers), with an ICMP 3/1 counter in the client
    gateway's raw PREROUTING (ahead of the gateway's own chain)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    with Lab() as lab:
        topo = routed_replicas(lab)
        d = RoutedDeployment(topo, Knobs(carriage=request.param))
        d.carriage = request.param
        backends = [start_backend(topo.servers[i], f"srv{i}") for i in range(2)]
        try:
            d.start()
            d.wait_registered(2)
            for proc in backends:
                proc.kill()
                proc.wait()
            d.wait_registered(0)
            topo.cgw.run(["iptables", "-t", "raw", "-I", "PREROUTING", "1", *COUNTER])
            yield d
            assert set(d.stop_all().values()) == {0}
        finally:
            for name in list(d.procs):
                d.kill(name)


def connect(d, timeout: float) -> list[str]:
    r = d.topo.client.run([sys.executable, "-c", CONNECT, VIRTUAL_ADDR, str(SERVICE_PORT), str(timeout)],
                          timeout=timeout + 30)
    return r.stdout.split()


def icmp_counted(d) -> int:
    out = d.topo.cgw.run(["iptables", "-t", "raw", "-L", "PREROUTING", "1", "-v", "-x", "-n"]).stdout
    assert "test-router-refusal" in out, out
    return int(out.split()[0])


def router_refusals(d) -> int:
    return sum(d.ctl(r, "stats").get("icmp_unreachable_no_service", 0) for r in ("r0", "r1"))


def _read(capture):
    try:
        return [(t, p) for t, p in pcap.read_pcap(capture.read_bytes()) if p and IPv4(p).protocol == 1]
    except (OSError, ValueError):
        return []          # not written yet, or a packet half written


def sal_at(pkt: bytes) -> int:
    return 28 if pkt[9] == 17 else 20


def test_the_refusal_reaches_the_client_gateway(gone, tmp_path):
    d = gone
    capture = tmp_path / "refusal.pcap"
    toward_routers = d.topo.cgw.run(["ip", "-o", "-4", "addr", "show", "to", d.topo.cgw_sal]).stdout.split()[1]
    dump = d.topo.cgw.popen(["tcpdump", "--immediate-mode", "-U", "-s", "0", "-ni", toward_routers, "-w", str(capture),
                             "icmp or ip proto 144 or udp port 54325"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while "listening on" not in (line := dump.stderr.readline()):
            assert line, "tcpdump did not start"
        counted0, refused0 = icmp_counted(d), router_refusals(d)
        connect(d, 1.5)
        d.wait_for(lambda: router_refusals(d) > refused0 and icmp_counted(d) > counted0, 5,
                   "an ICMP counted by a router and seen in the client gateway's namespace")
        d.wait_for(lambda: any(p[20:22] == b"\x03\x01" for _, p in _read(capture)), 5, "the ICMP in the capture")
    finally:
        dump.terminate()
        dump.wait(5)
    stats = [d.ctl(r, "stats") for r in ("r0", "r1")]
    assert not any(s.get("icmp_rate_limited") for s in stats), stats
    packets = [p for _, p in pcap.read_pcap(capture.read_bytes()) if p]
    routers = {aton(d.topo.router_addr(i)) for i in range(2)}
    syns = [p for p in packets if IPv4(p).dst in routers and IPv4(p).src == aton(d.topo.cgw_sal)]
    icmps = [p for p in packets if IPv4(p).protocol == 1 and p[20:22] == b"\x03\x01"]
    assert syns and icmps, (len(syns), len(icmps))
    for icmp in icmps:
        ip = IPv4(icmp)
        quote = icmp[28:]
        assert ip.src in routers and ip.dst == aton(d.topo.cgw_sal) and quote[16:20] == ip.src
        assert quote[9] == (17 if d.carriage == "udp" else 144)
        # the SYN as it arrived at the router: as sent by the client gateway from the IP
        # payload on (the routers in between change TTL and IP checksum only)
        sent = [s for s in syns if s[20:] == quote[20:] and s[12:20] == quote[12:20]]
        assert sent, "the quote is not a SYN the client gateway sent"
        hdr, _ = wire.decode(quote, sal_at(quote))
        assert hdr.control.flags == wire.SYN and hdr.dst_flow == 0 and hdr.checksum_ok


def test_the_legacy_client_is_refused_at_once(gone):
    """A plain connect() by the virtual address fails with a refusal, not a time-out."""
    result = connect(gone, 5.0)
    assert result[0] in ("ConnectionRefusedError", "ConnectionResetError"), result
