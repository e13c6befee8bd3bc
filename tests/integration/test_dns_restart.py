"""One mapping, two processes: the resolver and the client gateway run apart, share only
the mappings file (and the gateway's control socket), and each may restart.

    client 198.19.1.2 --- cgw 198.19.1.1 [serval dns] [client gateway] === sgw --- server
"""
import json
import shutil
import subprocess
import sys
import time

import pytest

from dns_resolver.lab import MappedGateways, RunningResolver, dig, resolver_config
from tests.integration.helpers import start_http, wait_port

ZONE = "svc.example"
RESOLVER = "198.19.1.1"

ECHO = r'''
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
def serve(c):
    with c:
        while data := c.recv(4096):
            c.sendall(data)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''

# Connects by name (the system resolver: /etc/netns/<ns>/resolv.conf points at us), then
# exchanges one line per line read on stdin, until stdin closes.
FLOW = r'''
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("connected", s.getpeername()[0], flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    got = b""
    while not got.endswith(b"\n"):
        got += s.recv(4096)
    print("echo", got.decode().strip(), flush=True)
s.close()
'''


@pytest.fixture
def tools(requires_netns):
    for tool in ("dig", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs `{tool}`")


def mappings(path):
    with open(path) as f:
        return {m["name"]: m["address"] for m in json.load(f)["mappings"]}


def address(pair, name):
    r = dig(pair.client, RESOLVER, name)
    assert r.status == "NOERROR" and len(r.values()) == 1, r.output
    return r.values()[0]


def build(pair, tmp_path, ask_gateway=False, **resolver_kw):
    path = str(tmp_path / "mappings.json")
    echo = pair.server.popen([sys.executable, "-c", ECHO, "8080"])
    wait_port(pair.server, "0.0.0.0", 8080)
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("api here\n")
    start_http(pair.server, www, 8081)
    gateways = MappedGateways(pair, path, [(f"web.{ZONE}", 80, 8080), (f"api.{ZONE}", 80, 8081)],
                              str(tmp_path)).start()
    config = resolver_config(listen=[RESOLVER], allow=["198.19.1.0/24"],
                             zones={ZONE: resolver_kw.pop("zone", ["web", "api"])}, upstreams=[],
                             mappings=path, gateway_control=gateways.sockets["client"] if ask_gateway else None,
                             **resolver_kw)
    resolver = RunningResolver(pair.cgw, config, str(tmp_path)).start()
    pair.client.write_etc("resolv.conf", f"nameserver {RESOLVER}\n")
    return path, gateways, resolver, echo


class Flow:
    def __init__(self, pair, name):
        self.proc = pair.client.popen([sys.executable, "-c", FLOW, name, "80"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("connected"), (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.peer = line.split()[1]

    def exchange(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self):
        self.proc.stdin.close()
        return self.proc.wait(10)


def test_resolver_and_gateway_restart_apart_names_and_flows_survive(pair, tools, tmp_path):
    path, gateways, resolver, _ = build(pair, tmp_path)
    try:
        web = address(pair, f"web.{ZONE}")
        assert mappings(path) == {f"web.{ZONE}": web}
        flow = Flow(pair, f"web.{ZONE}")                           # a live flow through the gateways
        assert flow.peer == web and flow.exchange("one") == "echo one"

        # a name first answered now: the running gateway learns it without a restart
        api = address(pair, f"api.{ZONE}")
        r = pair.client.run(["curl", "-sS", "--fail", "-m", "10", f"http://api.{ZONE}/"], check=False, timeout=20)
        assert r.stdout == "api here\n", (r.stderr, gateways.log("client"))

        # 1. the resolver restarts: same addresses, the flow goes on
        assert resolver.stop() == 0
        assert "stopped:" in resolver.log()
        resolver.start()
        assert address(pair, f"web.{ZONE}") == web and address(pair, f"api.{ZONE}") == api
        assert "2 mapping(s) loaded" in resolver.log()
        assert flow.exchange("two") == "echo two"
        assert gateways.ctl("client", "virtual_in_use") == [web]
        assert flow.close() == 0

        # 2. the client gateway restarts: it reads the mappings at start, the resolver
        #    keeps answering the same addresses
        assert gateways.stop("client") == {"client": 0}
        gateways.start("client")
        assert address(pair, f"web.{ZONE}") == web and address(pair, f"api.{ZONE}") == api
        flow = Flow(pair, f"web.{ZONE}")
        assert flow.peer == web and flow.exchange("three") == "echo three"
        assert flow.close() == 0
        r = pair.client.run(["curl", "-sS", "--fail", "-m", "10", f"http://api.{ZONE}/"], check=False, timeout=20)
        assert r.stdout == "api here\n", r.stderr
        assert mappings(path) == {f"web.{ZONE}": web, f"api.{ZONE}": api}
    finally:
        codes = gateways.stop()
        assert resolver.stop() == 0
    assert codes == {"client": 0, "server": 0}


def test_reclaim_only_after_ttl_and_without_live_flows(pair, tools, tmp_path):
    path, gateways, resolver, _ = build(
        pair, tmp_path, ask_gateway=True, zone={"_zone": {"ttl": 1}, "services": ["web", "api"]},
        virtual={"reclaim_after": 1.0, "reclaim_interval": 0.2, "flush_interval": 0.2})
    try:
        web = address(pair, f"web.{ZONE}")
        api = address(pair, f"api.{ZONE}")
        flow = Flow(pair, f"web.{ZONE}")
        assert flow.exchange("hold") == "echo hold"
        deadline = time.monotonic() + 6
        while f"api.{ZONE}" in mappings(path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mappings(path) == {f"web.{ZONE}": web}, resolver.log()       # api went, web is in use
        assert f"reclaimed api.{ZONE} -> {api}" in resolver.log()
        time.sleep(1.5)
        assert f"web.{ZONE}" in mappings(path)                               # still in use: kept
        assert flow.exchange("still") == "echo still"
        assert flow.close() == 0
        deadline = time.monotonic() + 8
        while f"web.{ZONE}" in mappings(path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"web.{ZONE}" not in mappings(path), (resolver.log(), gateways.ctl("client", "flows"))
        assert f"reclaimed web.{ZONE} -> {web}" in resolver.log()
        assert address(pair, f"web.{ZONE}") == web                           # back where it was
    finally:
        gateways.stop()
        assert resolver.stop() == 0


def test_without_the_gateway_nothing_is_reclaimed(pair, tools, tmp_path):
    path = str(tmp_path / "mappings.json")
    config = resolver_config(listen=[RESOLVER], allow=["198.19.1.0/24"],
                             zones={ZONE: {"_zone": {"ttl": 1}, "services": ["web"]}}, upstreams=[],
                             mappings=path, gateway_control=str(tmp_path / "no-such.sock"),
                             virtual={"reclaim_after": 1.0, "reclaim_interval": 0.2})
    resolver = RunningResolver(pair.cgw, config, str(tmp_path)).start()
    try:
        web = address(pair, f"web.{ZONE}")
        time.sleep(2.0)
        assert mappings(path) == {f"web.{ZONE}": web}
        assert "reclaiming nothing" in resolver.log()
    finally:
        assert resolver.stop() == 0


