"""The kernel fast path in real namespaces: transfers whose packets the kernel
translates, a gateway killed while the kernel carries its flows, and nothing left
behind. The lab's legacy links are wire-like (``gateway_pair(wire=True)``), so the
gateways receive wire-sized packets as from a NIC."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from tests.integration.helpers import make_file, ruleset, sha256_file, start_http, start_py_server

MB = 1024 * 1024

UPLOAD_PY = r'''
import socket, sys, hashlib
path, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.create_connection((addr, port), timeout=60)
with open(path, "rb") as f:
    while chunk := f.read(1 << 16):
        s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
print(s.recv(200).decode())
'''


@pytest.fixture(autouse=True)
def fast_path_required(requires_netns):
    from tests.unit.test_fastpath_bpf import _unavailable
    reason = _unavailable()
    if reason:
        if os.environ.get("SERVAL_REQUIRE_FASTPATH"):
            pytest.fail(f"SERVAL_REQUIRE_FASTPATH is set but {reason}")
        pytest.skip(reason)


def kernel_state(host) -> dict:
    """What the fast path may change on a host: qdiscs, tc filters, GRO/LRO."""
    state = {"qdisc": host.run(["tc", "qdisc", "show"]).stdout}
    filters, offloads = [], []
    for name in re.findall(r"^\d+: ([^:@]+)", host.run(["ip", "-o", "link", "show"]).stdout, re.M):
        for hook in ("ingress", "egress"):
            filters.append(f"{name} {hook}:" + host.run(["tc", "filter", "show", "dev", name, hook]).stdout)
        k = host.run(["ethtool", "-k", name], check=False).stdout
        offloads.append(name + ":" + " ".join(l for l in k.splitlines() if "receive-offload" in l
                                              or "segmentation-offload" in l or "tx-checksumming" in l))
    state["filters"], state["offloads"] = filters, offloads
    return state


def serval_programs() -> int:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True).stdout
    return sum(1 for p in json.loads(out or "[]") if p.get("name") == "serval_ingress")


def wait_for(what, condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def bpffs(tmp_path):
    """A bpf filesystem of the test's own, mounted where the lab's namespaces see it."""
    path = tmp_path / "bpffs"
    path.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], check=True)
    yield path
    subprocess.run(["umount", str(path)], check=True)


def build(lab, tmp_path, carriage="ip", fast_path="on", bpffs=None, redirect=False):
    www = tmp_path / "www"
    www.mkdir()
    pair = gateway_pair(lab, server_route_back=False, wire=True)
    before = {h.name: (ruleset(h), kernel_state(h)) for h in (pair.cgw, pair.sgw)}
    gws = RunningGateways(pair, carriage=carriage, fast_path=fast_path,
                          extra_services=[("up.svc.example", 81, VIRTUAL_ADDR, 9000)])
    for path in gws.configs.values():       # where to pin (the default /sys/fs/bpf is not
        path.write_text(path.read_text().replace(   # mounted under `ip netns exec`)
            "[gateway]\n", f'[gateway]\nbpffs = "{bpffs or "/nonexistent"}"\n'
            f'fast_path_redirect = {json.dumps(redirect)}\n', 1))
    gws.start()
    start_http(pair.server, www)
    start_py_server(pair.server, "halfclose", 9000)
    return pair, gws, before, www


def finish(pair, gws, before):
    """Both gateways stop cleanly and leave every host in ``before`` as they found it."""
    assert gws.stop() == {"client": 0, "server": 0}
    for h in (h for h in (pair.cgw, pair.sgw, pair.server) if h.name in before):
        rules, kernel = before[h.name]
        assert ruleset(h) == rules
        assert kernel_state(h) == kernel, "qdiscs, filters and offloads as before start"


def kernel_flows(gws, role) -> list:
    return [f for f in gws.ctl(role, "flows") if f.get("path") == "kernel"]


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_transfers_both_ways_are_translated_in_the_kernel(lab, tmp_path, carriage):
    pair, gws, before, www = build(lab, tmp_path, carriage)
    src = make_file(www, "50MB.bin", 50 * MB)
    out = tmp_path / "got.bin"
    dl = pair.client.popen(["curl", "-sS", "--fail", "-m", "120", "--limit-rate", "25M", "-o", str(out),
                            f"http://{VIRTUAL_ADDR}/50MB.bin"], stderr=subprocess.PIPE, text=True)
    wait_for("the download's flow in the kernel on both gateways",
             lambda: kernel_flows(gws, "client") and kernel_flows(gws, "server"))
    row = kernel_flows(gws, "client")[0]
    assert row["state"] == "established"
    _, err = dl.communicate(timeout=120)
    assert dl.returncode == 0, err
    assert sha256_file(out) == sha256_file(src)
    # upload: the server reads to EOF (a half-close), then answers with what it got
    up = make_file(tmp_path, "up.bin", 20 * MB)
    r = pair.client.run([sys.executable, "-c", UPLOAD_PY, str(up), VIRTUAL_ADDR, "81"], timeout=90)
    assert r.stdout.split() == [str(20 * MB), sha256_file(up)]
    stats = {role: gws.stats(role) for role in ("client", "server")}
    for role, s in stats.items():
        assert s["fastpath"] == "on"
        assert s["fastpath_errors"] == 0 and s.get("internal_errors", 0) == 0
        kernel = s["fastpath_to_sal"] + s["fastpath_from_sal"]
        python = s.get("to_sal", 0) + s.get("from_sal", 0)
        assert kernel > 20 * python, f"{role}: {kernel} packets in the kernel, {python} in Python"
    # the bytes the kernel carried are counted for the flows too (client: bytes in)
    assert stats["client"]["fastpath_from_sal"] > 50 * MB // 1500
    finish(pair, gws, before)


def tcp_checksum_errors(host) -> int:
    head, values = [l.split() for l in host.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
                    if l.startswith("Tcp:")]
    return int(values[head.index("InCsumErrors")])


@pytest.mark.parametrize("finished_on", ["gateways_link", "legacy_links"])
def test_checksums_left_to_the_device_come_out_right(lab, tmp_path, finished_on):
    """The program moves a checksum itself, unless the packet's is CHECKSUM_COMPLETE. A
    partial one (the legacy hosts here leave theirs to the device, as behind a NIC with
    checksum offload) is finished by the first device without offload: here the
    gateways' link (SAL packets, checked after the server gateway turns them back), or
    the legacy links (legacy packets, from a program that saw them partial both ways).
    The receivers' TCP checks every segment; a wrong sum shows as InCsumErrors."""
    pair, gws, before, www = build(lab, tmp_path)
    links = {"gateways_link": [(pair.cgw, pair.cgw_sal_if), (pair.sgw, pair.sgw_sal_if)],
             "legacy_links": [(pair.cgw, pair.cgw_lan_if), (pair.sgw, pair.sgw_lan_if)]}[finished_on]
    for host, ifname in links:
        host.run(["ethtool", "-K", ifname, "tx", "off"])
    for host, ifname in ((pair.client, pair.client_if), (pair.server, pair.server_if)):
        host.run(["ethtool", "-K", ifname, "tx", "on"])       # segments stay MTU-sized
    errors = {h.name: tcp_checksum_errors(h) for h in (pair.client, pair.server)}
    src = make_file(www, "20MB.bin", 20 * MB)
    out = tmp_path / "got.bin"
    pair.client.run(["curl", "-sS", "--fail", "-m", "60", "-o", str(out), f"http://{VIRTUAL_ADDR}/20MB.bin"],
                    timeout=70)
    assert sha256_file(out) == sha256_file(src)
    up = make_file(tmp_path, "up.bin", 20 * MB)
    r = pair.client.run([sys.executable, "-c", UPLOAD_PY, str(up), VIRTUAL_ADDR, "81"], timeout=90)
    assert r.stdout.split() == [str(20 * MB), sha256_file(up)]
    assert {h.name: tcp_checksum_errors(h) for h in (pair.client, pair.server)} == errors
    for role in ("client", "server"):
        s = gws.stats(role)
        assert s["fastpath_errors"] == 0
        assert s["fastpath_to_sal"] > 20 * MB // 1500 and s["fastpath_from_sal"] > 20 * MB // 1500, s
    for host, ifname in links:
        host.run(["ethtool", "-K", ifname, "tx", "on"])
    finish(pair, gws, before)


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_the_client_gateway_hosts_own_connections_are_translated_in_the_kernel(lab, tmp_path, carriage):
    """Processes on the client gateway's host (the client container beside the gateway
    in docker-compose): their TCP toward the virtual range goes through lo, where the
    kernel translates what it owns and queues the rest (SYN, FIN) for Python."""
    pair, gws, before, www = build(lab, tmp_path, carriage)
    assert "198.18.0.0/16 dev lo" in pair.cgw.run(["ip", "route", "show", "198.18.0.0/16"]).stdout
    up = make_file(tmp_path, "up.bin", 20 * MB)
    r = pair.cgw.run([sys.executable, "-c", UPLOAD_PY, str(up), VIRTUAL_ADDR, "81"], timeout=90)
    assert r.stdout.split() == [str(20 * MB), sha256_file(up)]
    src = make_file(www, "20MB.bin", 20 * MB)
    out = tmp_path / "got.bin"
    pair.cgw.run(["curl", "-sS", "--fail", "-m", "90", "-o", str(out), f"http://{VIRTUAL_ADDR}/20MB.bin"], timeout=100)
    assert sha256_file(out) == sha256_file(src)
    s = gws.stats("client")
    assert s["fastpath_errors"] == 0 and s.get("internal_errors", 0) == 0
    kernel = {k: v for k, v in s.items() if k.startswith("fastpath") or k.endswith("_sal")}
    print(kernel)
    assert s["fastpath_to_sal"] > 20 * s.get("to_sal", 0), str(kernel)
    assert s["fastpath_from_sal"] > 20 * s.get("from_sal", 0), str(kernel)
    assert s["fastpath_to_sal"] > 20 * MB // 1500
    finish(pair, gws, before)
    assert pair.cgw.run(["ip", "route", "show", "198.18.0.0/16"]).stdout == ""


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_redirect_hands_translated_packets_to_the_next_hop(lab, tmp_path, carriage):
    pair, gws, before, www = build(lab, tmp_path, carriage, redirect=True)
    src = make_file(www, "30MB.bin", 30 * MB)
    out = tmp_path / "got.bin"
    pair.client.run(["curl", "-sS", "--fail", "-m", "60", "-o", str(out), f"http://{VIRTUAL_ADDR}/30MB.bin"],
                    timeout=70)
    assert sha256_file(out) == sha256_file(src)
    for role in ("client", "server"):
        s = gws.stats(role)
        assert s["fastpath_errors"] == 0
        # nearly every translated packet went straight out (the first ones may find no
        # neighbour entry yet and take the stack)
        assert s["fastpath_redirected"] > 0.9 * (s["fastpath_to_sal"] + s["fastpath_from_sal"]), s
    finish(pair, gws, before)


def test_redirect_auto_follows_this_hosts_packet_filters(lab, tmp_path):
    """fast_path_redirect = "auto" (the default): straight to the next hop while the
    gateway's host has no packet filters but the gateways' own; a rule added later
    turns it off at the next look (SIGHUP here), so the rule applies to every packet."""
    pair, gws, before, www = build(lab, tmp_path, redirect="auto")
    src = make_file(www, "20MB.bin", 20 * MB)
    out = tmp_path / "got.bin"

    def download():
        pair.client.run(["curl", "-sS", "--fail", "-m", "60", "-o", str(out), f"http://{VIRTUAL_ADDR}/20MB.bin"],
                        timeout=70)
        assert sha256_file(out) == sha256_file(src)

    def translated(s):
        return s["fastpath_to_sal"] + s["fastpath_from_sal"]

    download()
    s = gws.stats("client")
    assert s["fastpath_redirect"] == "on" and gws.stats("server")["fastpath_redirect"] == "on"
    assert s["fastpath_redirected"] > 0.9 * translated(s), s
    assert "fast path redirect on (this namespace has no packet filters but the gateways' own)" in gws.log("client")
    # a rule of the host's own: it counts what it sees
    counter = ["FORWARD", "-i", pair.cgw_sal_if, "-p", "tcp"]     # SAL data, turned to TCP
    pair.cgw.run(["iptables", "-A", *counter])
    gws.signal("client", signal.SIGHUP)
    wait_for("redirect off after the look", lambda: gws.stats("client")["fastpath_redirect"] == "off")
    assert "fast path redirect off (1 iptables rule(s) in table filter)" in gws.log("client")
    seen = gws.stats("client")
    download()
    s = gws.stats("client")
    assert s["fastpath_redirected"] == seen["fastpath_redirected"]
    assert translated(s) - translated(seen) > 20 * MB // 1500
    rule = pair.cgw.run(["iptables", "-v", "-x", "-n", "-L", "FORWARD"]).stdout.splitlines()[2].split()
    assert int(rule[0]) > 20 * MB // 1500, "the host's rule saw the translated packets"
    pair.cgw.run(["iptables", "-D", *counter])
    pair.cgw.run(["nft", "delete", "table", "ip", "filter"])      # the test's own, now empty
    finish(pair, gws, before)


def test_with_the_fast_path_off_every_packet_is_python(lab, tmp_path):
    pair, gws, before, www = build(lab, tmp_path, fast_path="off")
    src = make_file(www, "10MB.bin", 10 * MB)
    out = tmp_path / "got.bin"
    pair.client.run(["curl", "-sS", "--fail", "-m", "60", "-o", str(out), f"http://{VIRTUAL_ADDR}/10MB.bin"],
                    timeout=70)
    assert sha256_file(out) == sha256_file(src)
    s = gws.stats("client")
    assert s["fastpath"] == "off" and "fastpath_to_sal" not in s
    assert s["from_sal"] > 10 * MB // 1500
    assert "fast path off" in gws.log("client")
    finish(pair, gws, before)


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "by-id"])
@pytest.mark.parametrize("role", ["client", "server"])
def test_kill_9_during_a_kernel_transfer(lab, tmp_path, role, pinned, request):
    """The kernel goes on translating while no daemon runs; the next start adopts it
    (from its pins in the bpffs, or by the ids in the state file)."""
    programs_before = serval_programs()
    fs = request.getfixturevalue("bpffs") if pinned else None
    fresh = set(fs.iterdir()) if fs is not None else None     # the kernel's own *.debug files
    pair, gws, before, www = build(lab, tmp_path, bpffs=fs)
    if fs is not None:
        pins = list(fs.glob("serval/*"))
        assert len(pins) == 2 and all(sorted(p.name for p in d.iterdir()) == [
            "prog", "serval_config", "serval_counters", "serval_flows", "serval_legacy"] for d in pins), pins
    src = make_file(www, "60MB.bin", 60 * MB)
    out = tmp_path / "got.bin"
    dl = pair.client.popen(["curl", "-sS", "--fail", "-m", "120", "--limit-rate", "10M", "-o", str(out),
                            f"http://{VIRTUAL_ADDR}/60MB.bin"], stderr=subprocess.PIPE, text=True)
    wait_for("the flow in the kernel", lambda: kernel_flows(gws, role))
    wait_for("a snapshot", lambda: out.exists() and out.stat().st_size > 5 * MB, 30)
    time.sleep(1.2)                               # a snapshot is written every second
    gws.signal(role, signal.SIGKILL)
    gws.procs[role].wait(5)
    size = out.stat().st_size
    wait_for("bytes while no daemon runs", lambda: out.stat().st_size > size + 4 * MB, 10)
    gws.launch(role)
    log = gws.log(role)
    assert "adopted the fast path a previous run left: 1 flow(s)" in log, log
    assert "resumed 1 established flow" in log, log
    host = pair.cgw if role == "client" else pair.sgw
    for name in ("eth0", "eth1"):
        shown = host.run(["tc", "filter", "show", "dev", name, "ingress"]).stdout
        assert shown.count("serval_ingress") == 1, shown     # adopted, not loaded twice
    _, err = dl.communicate(timeout=120)
    assert dl.returncode == 0, err
    assert sha256_file(out) == sha256_file(src)
    assert gws.stats(role)["fastpath_adopted"] == 1
    finish(pair, gws, before)
    if fs is not None:
        assert set(fs.iterdir()) == fresh, "the pins go on a clean stop"
    # (an earlier test's programs may still have been on their way out when counted)
    wait_for("the programs to be freed", lambda: serval_programs() <= programs_before)
