"""A router's names view, which the resolver polls ([liveness]): served over TCP on the
router's address, it shows a service's live instances as registrations come and go."""
import json
import sys

from lab.routed import Knobs, RoutedDeployment, start_backend
from lab.topologies import routed_replicas
from lab.topology import Lab
from lab.gateways import SERVICE

ASK_PY = r'''
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(json.dumps({"cmd": "live_names"}).encode() + b"\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.decode())
'''


def live_instances(d, router_addr: str) -> tuple[bool, int]:
    r = d.topo.cgw.run([sys.executable, "-c", ASK_PY, router_addr, "54327"], timeout=20)
    reply = json.loads(r.stdout)
    assert reply["ok"], reply
    view = reply["result"]
    names = {row["name"]: row["instances"] for row in view["names"]}
    return view["ready"], names.get(SERVICE, 0)


def test_the_names_view_follows_registrations(requires_netns):
    with Lab() as lab:
        topo = routed_replicas(lab, replicas=1, routers=1)
        d = RoutedDeployment(topo, Knobs())
        path = d.configs["r0"]
        path.write_text(path.read_text().replace(
            "[router]\n", f'[router]\nnames_view = "{topo.router_addr(0)}:54327"\n', 1))
        start_backend(topo.servers[0], "srv0")
        try:
            d.start()
            d.wait_registered(1)
            d.wait_for(lambda: live_instances(d, topo.router_addr(0)) == (True, 1), 5, "the replica in the view")
            d.kill("sgw0")                       # its registrations stop: the router forgets it
            d.wait_for(lambda: live_instances(d, topo.router_addr(0)) == (True, 0), 5, "no instance left")
            codes = d.stop_all()
            assert set(codes.values()) == {0}
        finally:
            for name in list(d.procs):
                d.kill(name)
