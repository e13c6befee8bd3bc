"""The lab itself: topology connectivity, teardown, and leak cleanup."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import netns

from lab.topologies import gateway_pair
from lab.topology import Lab

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("requires_netns")]
ROOT = Path(__file__).resolve().parents[2]


def lab_namespaces(prefix):
    return [n for n in netns.listnetns() if n.startswith(prefix + "-")]


def http_get(host, addr, max_time=3):
    return host.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                     "--max-time", str(max_time), f"http://{addr}:8000/"],
                    check=False)


def serve_http(host, addr):
    proc = host.popen([sys.executable, "-m", "http.server", "-b", addr, "8000"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while "8000" not in host.run(["ss", "-Hltn", "sport = :8000"]).stdout:
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return proc


def test_pair_addresses_and_routes(pair):
    out = pair.cgw.run(["ip", "-4", "-o", "addr", "show", "dev", pair.cgw_sal_if]).stdout
    assert f"{pair.cgw_sal}/24" in out
    assert pair.sgw.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    assert f"via {pair.cgw_lan}" in pair.client.run(["ip", "route"]).stdout


def test_client_reaches_server(pair):
    serve_http(pair.server, pair.server_addr)
    r = http_get(pair.client, pair.server_addr)
    assert (r.returncode, r.stdout) == (0, "200"), r.stderr


def test_no_route_back(lab):
    p = gateway_pair(lab, server_route_back=False)
    serve_http(p.server, p.server_addr)
    assert "default" not in p.server.run(["ip", "route"]).stdout
    assert http_get(p.client, p.server_addr, max_time=1).returncode != 0
    # The server's own subnet still works (the server gateway's side).
    assert http_get(p.sgw, p.server_addr).stdout == "200"


def test_teardown_removes_everything():
    lab = Lab()
    try:
        a, b = lab.add_host("a"), lab.add_host("b")
        lab.link(a, b, "198.19.7.1/24", "198.19.7.2/24", mtu=1400)
        sleeper = b.popen(["sleep", "60"])
        etc = Path(a.write_etc("resolv.conf", "nameserver 198.19.7.2\n"))
        assert "198.19.7.2" in a.run(["cat", "/etc/resolv.conf"]).stdout
        assert "mtu 1400" in b.run(["ip", "link", "show", "eth0"]).stdout
    finally:
        lab.teardown()
    assert lab_namespaces(lab.prefix) == []
    assert sleeper.returncode is not None
    assert not etc.parent.exists()
    lab.teardown()  # second call is a no-op


def test_teardown_after_partial_build():
    lab = Lab()
    lab.add_host("a")
    with pytest.raises(ValueError):
        lab.add_host("a")
    lab.teardown()
    assert lab_namespaces(lab.prefix) == []


def test_cleanup_removes_leaked_lab():
    leaked = Lab()
    try:
        a, b = leaked.add_host("a"), leaked.add_host("b")
        leaked.link(a, b, "198.19.8.1/24", "198.19.8.2/24")
        # Untracked, in its own session: only the namespace scan can find it.
        stray = subprocess.Popen(["ip", "netns", "exec", a.ns, "sleep", "60"],
                                 start_new_session=True)
        a.write_etc("resolv.conf", "nameserver 198.19.8.2\n")
        # Limited to our prefix: labs of concurrent test runs stay untouched.
        r = subprocess.run([sys.executable, "-m", "lab.cleanup", leaked.prefix],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert f"removed {a.ns}" in r.stdout
        assert lab_namespaces(leaked.prefix) == []
        assert not Path("/etc/netns", a.ns).exists()
        assert stray.wait(timeout=5) != 0  # killed by the namespace scan
        r = subprocess.run([sys.executable, "-m", "lab.cleanup", leaked.prefix],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert (r.returncode, r.stdout) == (0, "lab.cleanup: nothing to remove\n")
    finally:
        leaked.teardown()
