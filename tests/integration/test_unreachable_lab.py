"""A server gateway whose backend has no route, for real (pyroute2 asking the kernel):
it refuses to start with the config line and what to check, not a bare errno, and
leaves the host's rules as they were."""
import pytest

from lab.gateways import GatewayError, RunningGateways
from lab.topologies import gateway_pair
from tests.integration.helpers import ruleset

UNROUTED = "10.77.0.5"          # no route to it in the server gateway's namespace (never sent to)


def test_a_backend_with_no_route_is_refused_with_its_config_line(lab):
    pair = gateway_pair(lab, server_route_back=False)
    before = ruleset(pair.sgw)
    gws = RunningGateways(pair, extra_services=[("db.svc.example", 5432, "198.18.0.12", 5432)])
    path = gws.configs["server"]
    text = path.read_text().replace(f'backend = "{pair.server_addr}:5432"', f'backend = "{UNROUTED}:5432"')
    path.write_text(text)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if UNROUTED in t)
    try:
        with pytest.raises(GatewayError):
            gws.launch("server", timeout=10)
        assert gws.procs["server"].wait(5) == 1
    finally:
        gws.stop()
    log = gws.log("server")
    assert f"{path}:{line}: the backend {UNROUTED}:5432 of service db.svc.example:5432 is unreachable" in log, log
    assert f"ip route get {UNROUTED}" in log and "(101," not in log, log
    assert ruleset(pair.sgw) == before
