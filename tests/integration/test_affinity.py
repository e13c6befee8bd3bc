"""Client affinity through service routers, for real: namespaces, NFQUEUE, the real
daemons, unmodified iperf3 and a plain socket client, two replicas both live.

    client --- cgw ---+--- r0, r1 (both: [[service]] affinity = "client")
                      +--- sgw0 --- srv0 (weight 1): BACKEND_PY on 8080 (answers "srv0"), iperf3 -s on 5201
                      +--- sgw1 --- srv1 (weight 3): the same, answering "srv1"

A router's "client" is the SYN's SAL source: here the one client gateway, so every
connection from behind it goes to one replica, whichever router forwards it (the hash is
the same on both), until that replica goes away.

Backend checks are rare here (the first decides at once, the next after 60 s, past the
module's end): iperf3's server takes any connection that arrives while a test sets up
its streams as one of them, so a check's connect aborts the test ("unable to receive
control message: Connection reset by peer" at the client, 4 runs in 12 with checks every
100 ms, none with checks every 3 s). Replicas leave here by drain, which withdraws at once.
"""
import json
import os
import subprocess
import time

import pytest

from lab.routed import Knobs, RoutedDeployment, run_client, start_backend
from lab.topologies import routed_replicas
from lab.topology import Lab

IPERF_NAME, IPERF_ADDR, IPERF_PORT = "iperf.svc.example", "198.18.0.11", 5201
HEALTH_INTERVAL = 60.0
AFFINITY = '\n[[service]]\nservice = "{}"\naffinity = "client"\naffinity_timeout = 60\n'


def with_iperf_service(d: RoutedDeployment) -> None:
    """Add the iperf3 service to every gateway's config and client affinity for both
    services to every router's (the lab writes the web service only)."""
    for name, path in d.configs.items():
        text = path.read_text()
        if name.startswith("r"):
            text += AFFINITY.format("web.svc.example") + AFFINITY.format(IPERF_NAME)
        elif name == "cgw":
            text = text.replace("[routing]", f'[[service]]\nname = "{IPERF_NAME}"\naddress = "{IPERF_ADDR}"\n'
                                              f"port = {IPERF_PORT}\n\n[routing]", 1)
        else:
            i = int(name[3:])
            text = text.replace("[routing]", f'[[service]]\nname = "{IPERF_NAME}"\nport = {IPERF_PORT}\n'
                                              f'backend = "{d.topo.server_addr(i)}:{IPERF_PORT}"\n\n[routing]', 1)
        path.write_text(text)


def start_iperf_server(host) -> subprocess.Popen:
    proc = host.popen(["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not host.run(["ss", "-ltnH", f"sport = :{IPERF_PORT}"], check=False).stdout.strip():
        assert proc.poll() is None and time.monotonic() < deadline, "iperf3 -s did not start"
        time.sleep(0.02)
    return proc


@pytest.fixture(scope="module")
def dep():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    with Lab() as lab:
        topo = routed_replicas(lab)
        d = RoutedDeployment(topo, Knobs(health_interval=HEALTH_INTERVAL))
        with_iperf_service(d)
        d.backends = {i: start_backend(topo.servers[i], f"srv{i}") for i in range(2)}
        servers = [start_iperf_server(topo.servers[i]) for i in range(2)]
        try:
            d.start()
            d.wait_for(lambda: all(len(d.ctl(r, "services")) == 4 for r in ("r0", "r1")), 10,
                       "both services registered by both instances at both routers")
            d.wait_for(lambda: all(r["health"] == "live" for r in d.ctl("cgw", "services")), 5, "routers live")
            yield d
            assert set(d.stop_all().values()) == {0}
        finally:
            for name in list(d.procs):
                d.kill(name)
            for proc in servers + list(d.backends.values()):
                proc.kill()


def replicas(d, n: int) -> dict:
    return run_client(d.topo.client, "split", n, 8, 3.0)["counts"]


def forwarded(d) -> list[int]:
    return [d.ctl(r, "stats").get("syn_forwarded", 0) for r in ("r0", "r1")]


def test_every_connection_of_a_client_reaches_one_replica_through_either_router(dep):
    before = forwarded(dep)
    counts = replicas(dep, 60)
    assert len(counts) == 1 and sum(counts.values()) == 60 and next(iter(counts)) in ("srv0", "srv1"), counts
    assert all(after > b for after, b in zip(forwarded(dep), before)), "both routers forwarded some"


def test_iperf3_parallel_streams_complete(dep):
    """iperf3's control connection and its four data connections land on one replica (on
    two replicas the data connections would meet a server that never saw the test).
    Twice, back to back, both directions: iperf3's server aborts its data connections
    at a test's end, and the next test's connections reuse their ports toward it."""
    for extra in ([], ["-R"]):
        r = dep.topo.client.run(["iperf3", "-c", IPERF_ADDR, "-p", str(IPERF_PORT), "-P", "4", "-t", "2", "-J",
                                 *extra], check=False, timeout=60)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        end = json.loads(r.stdout)["end"]
        assert len(end.get("streams", ())) == 4 and end["sum_received"]["bytes"] > 0, r.stdout[-3000:]


def test_draining_wins_and_the_client_stays_when_its_replica_returns(dep):
    (home,) = replicas(dep, 20)
    i = int(home[3:])
    other = f"srv{1 - i}"
    dep.ctl(f"sgw{i}", "drain", service="web.svc.example")
    try:
        dep.wait_for(lambda: all(len(dep.ctl(r, "services")) == 3 for r in ("r0", "r1")), 5, f"{home} withdrawn")
        assert replicas(dep, 40) == {other: 40}            # draining wins over affinity
    finally:
        dep.ctl(f"sgw{i}", "drain", service="web.svc.example", cancel=True)
    dep.wait_for(lambda: all(len(dep.ctl(r, "services")) == 4 for r in ("r0", "r1")), 5, f"{home} back")
    assert replicas(dep, 40) == {other: 40}                # an active client is not taken by a returning replica
