"""The server gateway's ports toward a backend, for real: a pool of 50 ports carries
hundreds of back-to-back connections to a real backend, because a port is ready again as
soon as the backend let go of it (the client closed first: the backend's socket ended in
LAST_ACK). Before, a port was held until its flow left the table (5 s after the close),
so 50 ports carried at most 10 new connections a second and a burst ran out of them.

    client --- cgw === SAL === sgw --- server (bench/tiny_server.py: closes when the client does)
"""
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


def test_back_to_back_connections_reuse_ports_as_soon_as_the_backend_let_go(lab):
    pair = gateway_pair(lab, server_route_back=False)
    before = {h.name: ruleset(h) for h in (pair.cgw, pair.sgw)}
    gws = RunningGateways(pair)
    server_toml = gws.configs["server"]
    server_toml.write_text(server_toml.read_text().replace(
        "[gateway]\n", f'[gateway]\nport_range = "20000-{20000 + PORTS - 1}"\n', 1))
    gws.start()
    try:
        pair.server.popen([sys.executable, str(REPO / "bench" / "tiny_server.py"), "8080"])
        wait_port(pair.server, "0.0.0.0", 8080)
        r = pair.client.run([sys.executable, "-c", CLIENT, str(CONNECTIONS), VIRTUAL_ADDR],
                            timeout=600)
        result = json.loads(r.stdout)
        stats = gws.stats("server")
    finally:
        codes = gws.stop()
    assert codes == {"client": 0, "server": 0}, (gws.log("client"), gws.log("server"))
    for h in (pair.cgw, pair.sgw):
        assert ruleset(h) == before[h.name], f"{h.name}: rules left behind"
    assert result == {"ok": CONNECTIONS, "failed": 0}
    assert stats.get("refused_ports_exhausted", 0) == 0, stats
    assert stats["flows_opened"] == CONNECTIONS
    # every port came back at once, most of them while their flow still lingered
    assert stats["ports_back_at_once"] >= CONNECTIONS - PORTS, stats
    assert stats.get("ports_back_after_time_wait", 0) == 0, stats
