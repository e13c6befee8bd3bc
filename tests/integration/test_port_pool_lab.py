"""The server gateway's ports toward a backend, for real: a pool of 50 ports carries
hundreds of back-to-back connections to a real backend, because a port is ready again as
soon as the backend let go of it (the client closed first: the backend's socket ended in
LAST_ACK). Before, a port was held until its flow left the table (5 s after the close),
so 50 ports carried at most 10 new connections a second and a burst ran out of them.

    client --- cgw === SAL === sgw --- server (bench/tiny_server.py: closes when the client does)

When the backend closes first (an HTTP/1.0 server), each 4-tuple stays in its TIME_WAIT
for 60 s; once every pair has been used, the pair longest in TIME_WAIT is taken early,
and a backend that does not take the new SYN as newer answers it with an ACK that the
gateway answers with a RST before sending the SYN again (docs/operations.md).
"""
import pytest
import json
import sys
from pathlib import Path

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from tests.integration.helpers import ruleset, wait_port

REPO = Path(__file__).resolve().parents[2]
CONNECTIONS, PORTS = 400, 50

CLIENT = """
import json, socket, sys
ok = failed = 0
for _ in range(int(sys.argv[1])):
    try:
        with socket.create_connection((sys.argv[2], 80), timeout=5) as s:
            s.sendall(b"x")
            ok += s.recv(16) == b"OK\\n"
    except OSError:
        failed += 1
print(json.dumps({"ok": ok, "failed": failed}))
"""


def through_a_small_pool(pair, server_script: str, client_code: str, count: int):
    """``count`` back-to-back connections from ``client_code`` to a backend running
    ``bench/<server_script>``, through a server gateway with PORTS ports toward it:
    (the client's result, the server gateway's counters). The gateways leave no rule."""
    before = {h.name: ruleset(h) for h in (pair.cgw, pair.sgw)}
    gws = RunningGateways(pair)
    server_toml = gws.configs["server"]
    server_toml.write_text(server_toml.read_text().replace(
        "[gateway]\n", f'[gateway]\nport_range = "20000-{20000 + PORTS - 1}"\n', 1))
    gws.start()
    try:
        pair.server.popen([sys.executable, str(REPO / "bench" / server_script), "8080"])
        wait_port(pair.server, "0.0.0.0", 8080)
        r = pair.client.run([sys.executable, "-c", client_code, str(count), VIRTUAL_ADDR], timeout=600)
        result = json.loads(r.stdout)
        stats = gws.stats("server")
    finally:
        codes = gws.stop()
    assert codes == {"client": 0, "server": 0}, (gws.log("client"), gws.log("server"))
    for h in (pair.cgw, pair.sgw):
        assert ruleset(h) == before[h.name], f"{h.name}: rules left behind"
    return result, stats


def test_back_to_back_connections_reuse_ports_as_soon_as_the_backend_let_go(lab):
    pair = gateway_pair(lab, server_route_back=False)
    result, stats = through_a_small_pool(pair, "tiny_server.py", CLIENT, CONNECTIONS)
    assert result == {"ok": CONNECTIONS, "failed": 0}
    assert stats.get("refused_ports_exhausted", 0) == 0, stats
    assert stats["flows_opened"] == CONNECTIONS
    # every port came back at once, most of them while their flow still lingered
    assert stats["ports_back_at_once"] >= CONNECTIONS - PORTS, stats
    assert stats.get("ports_back_after_time_wait", 0) == 0, stats


HTTP_CLIENT = """
import json, socket, sys
ok = failed = 0
for _ in range(int(sys.argv[1])):
    try:
        with socket.create_connection((sys.argv[2], 80), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
            ok += reply.endswith(b"\\r\\n\\r\\nok")
    except OSError:
        failed += 1
print(json.dumps({"ok": ok, "failed": failed}))
"""
EARLY_CONNECTIONS = 300


@pytest.mark.parametrize("timestamps", [1, 0], ids=["timestamps", "no-timestamps"])
def test_a_backend_that_closes_first_keeps_taking_connections_on_pairs_taken_early(lab, timestamps):
    """300 back-to-back HTTP/1.0 requests over 50 ports toward a backend that closes
    first: 250 of them take a pair still in the backend's TIME_WAIT, and all complete.
    Without TCP timestamps on the client, the backend judges the new SYN by its sequence
    number alone, and about half the time answers with the old connection's ACK: those
    are the RSTs that end its TIME_WAIT (with timestamps, a client's newer timestamp
    lets the backend take the SYN outright most of the time)."""
    pair = gateway_pair(lab, server_route_back=False)
    pair.client.sysctl("net.ipv4.tcp_timestamps", timestamps)
    result, stats = through_a_small_pool(pair, "tiny_http.py", HTTP_CLIENT, EARLY_CONNECTIONS)
    assert result == {"ok": EARLY_CONNECTIONS, "failed": 0}, stats
    assert stats.get("refused_ports_exhausted", 0) == 0, stats
    assert stats["ports_reused_in_time_wait"] == EARLY_CONNECTIONS - PORTS, stats
    if not timestamps:
        assert stats.get("backend_time_wait_reset", 0) > 0, stats
