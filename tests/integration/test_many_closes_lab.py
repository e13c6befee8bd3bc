"""Thousands of connections opened as one burst and closed at the same instant, through
the gateway pair: every close completes at both legacy ends, both gateways' flow tables
empty, and the kernel dropped nothing from their queues (issue 13: a 4096-packet queue
lost 39,424 packets when 10,000 connections closed at once).
"""
import os
from collections import Counter
import subprocess
import sys
import time

import pytest

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from tests.integration.helpers import ruleset, wait_port

CONNECTIONS = 4000

# Accepts everything, answers each connection's first byte, and closes its end when the
# client closes (so each close is FIN one way, FIN the other, as a web server does).
HOLD_SERVER = r'''
import resource, selectors, socket, sys
HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (HARD, HARD))
sel = selectors.DefaultSelector()
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(65535); srv.setblocking(False)
sel.register(srv, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is srv:
            try:
                while True:
                    c, _ = srv.accept(); c.setblocking(False); sel.register(c, selectors.EVENT_READ)
            except BlockingIOError:
                pass
            continue
        try:
            data = s.recv(100)
        except OSError:
            data = b""
        if data:
            s.send(data)
        else:
            sel.unregister(s); s.close()
'''

# Opens N connections as one burst of SYNs, checks each end to end (one byte there and
# back), prints "open", then closes them all at once and prints "closed".
BURST_CLIENT = r'''
import resource, selectors, socket, sys, time
HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (HARD, HARD))
sel = selectors.DefaultSelector()
socks = []
for _ in range(n):
    s = socket.socket(); s.setblocking(False)
    s.connect_ex((addr, port))
    sel.register(s, selectors.EVENT_WRITE)
    socks.append(s)
deadline = time.monotonic() + 40
waiting = set(socks)
while waiting and time.monotonic() < deadline:
    for key, ev in sel.select(1):
        s = key.fileobj
        if ev & selectors.EVENT_WRITE:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                sys.exit(f"connect failed: errno {err}")
            s.send(b"x"); sel.modify(s, selectors.EVENT_READ)
        elif s.recv(1) == b"x":
            sel.unregister(s); waiting.discard(s)
if waiting:
    sys.exit(f"{len(waiting)} of {n} connections not answered in 40 s")
print("open", flush=True)
for s in socks:
    s.close()
print("closed", flush=True)
'''

UNFINISHED = "state fin-wait-1 state fin-wait-2 state closing state last-ack state close-wait state established"


def unfinished(host, port_filter: str) -> int:
    """Connections of ``host`` matching ``port_filter`` not yet fully closed (TIME-WAIT,
    the closer's normal end, counts as closed)."""
    out = host.run(["sh", "-c", f"ss -tanH {UNFINISHED} '{port_filter}' | wc -l"], check=False).stdout
    return int(out.strip() or 0)


def queue_drops(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k.startswith("kernel_") and "dropped" in k}


def wait_for(condition, timeout: float):
    """``condition()`` once it is 0, or its value at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value == 0 or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_thousands_of_connections_close_at_once(lab):
    from tests.unit.test_fastpath_bpf import _unavailable
    if os.environ.get("SERVAL_REQUIRE_FASTPATH") and _unavailable():
        pytest.fail(f"SERVAL_REQUIRE_FASTPATH is set but {_unavailable()}")
    pair = gateway_pair(lab, server_route_back=False)
    before_rules = {h.name: ruleset(h) for h in (pair.cgw, pair.sgw)}
    pair.server.popen([sys.executable, "-c", HOLD_SERVER, "8080"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(pair.server, "0.0.0.0", 8080)
    gws = RunningGateways(pair)
    for role, path in gws.configs.items():
        # a state directory of its own: a snapshot another test's gateway left in
        # /run/serval under the same instance name and a reused namespace inode number
        # would otherwise be resumed here, with flows that never close
        state = gws.dir / f"{role}-state"
        state.mkdir()
        path.write_text(path.read_text().replace("[gateway]\n", f'[gateway]\nstate_dir = "{state}"\n', 1))
    gws.start()
    try:
        if os.environ.get("SERVAL_REQUIRE_FASTPATH"):
            assert gws.stats("client")["fastpath"] == "on", gws.log("client")
        drops_before = {role: queue_drops(gws.stats(role)) for role in ("client", "server")}
        assert all(drops_before.values()), "the kernel's queue counters are not read"

        r = pair.client.run([sys.executable, "-c", BURST_CLIENT, VIRTUAL_ADDR, "80", str(CONNECTIONS)],
                            check=False, timeout=90)
        assert r.returncode == 0 and r.stdout.split() == ["open", "closed"], r.stdout + r.stderr

        left_client = wait_for(lambda: unfinished(pair.client, "dport = :80"), 30)
        left_server = wait_for(lambda: unfinished(pair.server, "sport = :8080"), 30)
        assert (left_client, left_server) == (0, 0), (
            f"closes not completed: {left_client} at the client, {left_server} at the server")
        for role in ("client", "server"):
            left = wait_for(lambda: len(gws.ctl(role, "flows")), 20)
            if left:
                states = Counter(f["state"] for f in gws.ctl(role, "flows"))
                pytest.fail(f"{role} gateway still holds {left} flow(s): {dict(states)}; "
                            f"{gws.stats(role)}")
        stats = {role: gws.stats(role) for role in ("client", "server")}
        assert stats["server"]["flows_opened"] == CONNECTIONS, stats["server"]
        for role in ("client", "server"):
            assert queue_drops(stats[role]) == drops_before[role], (role, queue_drops(stats[role]))
    finally:
        codes = gws.stop()
    assert codes == {"client": 0, "server": 0}, (gws.log("client"), gws.log("server"))
    for h in (pair.cgw, pair.sgw):
        assert ruleset(h) == before_rules[h.name], f"{h.name}: rules left behind"
