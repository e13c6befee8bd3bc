"""A name whose last instance is gone, for real: `serval dns` polls a router's names
view over TCP and stops handing the name out; dig and glibc (getent) ask.

    client 198.19.31.2 [dig, getent; stand-in router :54327] --- 198.19.31.1 [serval dns]

The router here is a stand-in: the routers' own control protocol
(gateway/adapters/control.py) on TCP, serving the ``live_names`` command from a file
the test rewrites (docs/resolver.md, "Names with no live instance": the interface a
router offers). The real router's side is not wired yet.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from dns_resolver.lab import REPO, RunningResolver, dig, resolver_config, wait_listening
from serval import metrics as m

RESOLVER, CLIENT = "198.19.31.1", "198.19.31.2"
ROUTER_PORT = 54327
METRICS_PORT = 9468
ZONE = "svc.example"

ROUTER = r'''
import json, sys
from twisted.internet import reactor
from gateway.adapters.control import ControlFactory

def live_names():
    with open(sys.argv[3]) as f:
        return json.load(f)

reactor.listenTCP(int(sys.argv[2]), ControlFactory({"live_names": live_names}), interface=sys.argv[1])
reactor.run()
'''


def view(path, *names, ready=True):
    rows = [{"name": n, "service_id": "00" * 32, "prefix_bits": 256, "port": None, "instances": k}
            for n, k in names]
    tmp = f"{path}.new"
    with open(tmp, "w") as f:
        json.dump({"ready": ready, "names": rows}, f)
    os.replace(tmp, path)


def wait_log(resolver, text, timeout=10.0):
    deadline = time.monotonic() + timeout
    while text not in resolver.log():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{resolver.log()}"
        time.sleep(0.05)


def counters(host) -> dict:
    r = host.run(["curl", "-sS", "--fail", "-m", "5", f"http://127.0.0.1:{METRICS_PORT}/metrics"])
    return {dict(labels)["stat"]: v for (name, labels), v in m.parse(r.stdout).items()
            if name == "serval_dns_stat_total"}


def getent(host, name):
    return host.run(["getent", "ahostsv4", name], check=False, timeout=30)


@pytest.fixture
def net(lab, tmp_path):
    for tool in ("dig", "getent", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs `{tool}`")
    dns, client = lab.add_host("dns"), lab.add_host("cli")
    lab.link(dns, client, f"{RESOLVER}/24", f"{CLIENT}/24")
    client.write_etc("resolv.conf", f"nameserver {RESOLVER}\noptions timeout:2 attempts:2\n")
    names = str(tmp_path / "names.json")
    view(names, (f"web.{ZONE}", 2))
    router = client.popen([sys.executable, "-c", ROUTER, CLIENT, str(ROUTER_PORT), names],
                          cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_listening(client, CLIENT, ROUTER_PORT, "t", proc=router)
        config = resolver_config(
            listen=[RESOLVER], allow=["198.19.31.0/24"], zones={ZONE: ["web", "api"]}, upstreams=[],
            metrics=f"127.0.0.1:{METRICS_PORT}",
            sections={"liveness": {"routers": f'["{CLIENT}:{ROUTER_PORT}"]', "interval": 0.2,
                                   "down_ttl": 5}})
        resolver = RunningResolver(dns, config, str(tmp_path)).start()
        yield type("Net", (), dict(dns=dns, client=client, router=router, names=names, resolver=resolver))
        assert resolver.stop() == 0, resolver.log()
    finally:
        if router.poll() is None:
            router.kill()
            router.wait()


def test_a_name_with_no_live_instance_is_nodata_until_one_comes_back(net):
    wait_log(net.resolver, "routers' names view: 1 of 2 routed name(s) with a live instance; none for api.svc.example")
    web = dig(net.client, RESOLVER, f"web.{ZONE}")
    assert web.status == "NOERROR" and len(web.values()) == 1, web.output
    api = dig(net.client, RESOLVER, f"api.{ZONE}")
    assert api.status == "NOERROR" and api.answer == [], api.output          # NODATA, not NXDOMAIN
    [(_, ttl, rtype, _)] = api.authority
    assert rtype == "SOA" and ttl == 5                                         # asked again within 5 s
    assert getent(net.client, f"api.{ZONE}").returncode == 2                  # glibc: no such host, at once
    assert counters(net.dns)["no_instance"] >= 1

    view(net.names, (f"web.{ZONE}", 1), (f"api.{ZONE}", 1))                  # an instance registers
    wait_log(net.resolver, f"api.{ZONE}: a live instance again")
    r = getent(net.client, f"api.{ZONE}")
    assert r.returncode == 0 and r.stdout.split()[0].startswith("198.18."), r.stdout

    view(net.names, (f"web.{ZONE}", 0), (f"api.{ZONE}", 1))                  # web's last instance goes
    wait_log(net.resolver, f"web.{ZONE}: no live instance at the routers: answering NODATA (ttl 5 s)")
    assert dig(net.client, RESOLVER, f"web.{ZONE}").answer == []
    assert getent(net.client, f"web.{ZONE}").returncode == 2


def test_when_the_router_cannot_be_asked_names_are_answered_as_before(net):
    wait_log(net.resolver, "none for api.svc.example")
    assert dig(net.client, RESOLVER, f"api.{ZONE}").answer == []
    view(net.names, (f"web.{ZONE}", 1), ready=False)                          # a restarted router warming up
    wait_log(net.resolver, "no ready router heard from within 0.6 s")
    assert len(dig(net.client, RESOLVER, f"api.{ZONE}").values()) == 1
    view(net.names, (f"web.{ZONE}", 1))
    wait_log(net.resolver, "routers' names view: 1 of 2", timeout=10)
    net.router.kill()                                                          # the router goes away
    net.router.wait()
    wait_log(net.resolver, f"cannot read router {CLIENT}:{ROUTER_PORT}'s names view")
    deadline = time.monotonic() + 10
    while not dig(net.client, RESOLVER, f"api.{ZONE}").values():            # unknown again: answered
        assert time.monotonic() < deadline, net.resolver.log()
        time.sleep(0.1)
    stats = counters(net.dns)
    assert stats["router_poll_failures"] >= 1
    assert net.resolver.proc.poll() is None
