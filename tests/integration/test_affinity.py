"""Client affinity through service routers, for real: namespaces, NFQUEUE, the real
daemons, unmodified iperf3 and a plain socket client, two replicas both live.

    client --- cgw ---+--- r0, r1 (both: [[service]] affinity = "client")
                      +--- sgw0 --- srv0 (weight 1): BACKEND_PY on 8080 (answers "srv0"), iperf3 -s
                      |                               on 5201, PostgreSQL on 5432 (its own database)
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
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from lab import postgres
from lab.routed import Knobs, RoutedDeployment, run_client, start_backend
from lab.topologies import routed_replicas
from lab.topology import Lab

IPERF_NAME, IPERF_ADDR, IPERF_PORT = "iperf.svc.example", "198.18.0.11", 5201
PG_NAME, PG_ADDR, PG_PORT = "pg.svc.example", "198.18.0.12", 5432
SERVICES = [("web.svc.example", None, None), (IPERF_NAME, IPERF_ADDR, IPERF_PORT), (PG_NAME, PG_ADDR, PG_PORT)]
REGISTERED = 2 * len(SERVICES)            # each service by both instances
HEALTH_INTERVAL = 60.0
AFFINITY = '\n[[service]]\nservice = "{}"\naffinity = "client"\naffinity_timeout = 60\n'


def with_services(d: RoutedDeployment) -> None:
    """Add the iperf3 and PostgreSQL services to every gateway's config and client
    affinity for every service to every router's (the lab writes the web service only)."""
    for name, path in d.configs.items():
        text = path.read_text()
        for service, addr, port in SERVICES:
            if name.startswith("r"):
                text += AFFINITY.format(service)
            elif addr is None:
                continue                  # the web service: the lab's own
            elif name == "cgw":
                text = text.replace("[routing]", f'[[service]]\nname = "{service}"\naddress = "{addr}"\n'
                                                  f"port = {port}\n\n[routing]", 1)
            else:
                i = int(name[3:])
                text = text.replace("[routing]", f'[[service]]\nname = "{service}"\nport = {port}\n'
                                                  f'backend = "{d.topo.server_addr(i)}:{port}"\n\n[routing]', 1)
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
    if postgres.binaries() is None:
        # CI installs it (Makefile APT_PACKAGES): fail there
        if os.environ.get("SERVAL_REQUIRE_FASTPATH"):
            pytest.fail("PostgreSQL (postgresql) is missing in CI")
        pytest.skip("needs PostgreSQL (Debian: postgresql)")
    # not under pytest's own temporary folder: the postgres user must walk into it
    work = Path(tempfile.mkdtemp(prefix="serval-affinity-"))
    os.chmod(work, 0o711)
    with Lab() as lab:
        topo = routed_replicas(lab)
        d = RoutedDeployment(topo, Knobs(health_interval=HEALTH_INTERVAL))
        with_services(d)
        d.backends = {i: start_backend(topo.servers[i], f"srv{i}") for i in range(2)}
        servers = [start_iperf_server(topo.servers[i]) for i in range(2)]
        d.pg_sockets = [postgres.start(topo.servers[i], work / f"pg{i}", topo.server_addr(i), PG_PORT)
                        for i in range(2)]
        try:
            d.start()
            d.wait_for(lambda: all(len(d.ctl(r, "services")) == REGISTERED for r in ("r0", "r1")), 10,
                       "every service registered by both instances at both routers")
            d.wait_for(lambda: all(r["health"] == "live" for r in d.ctl("cgw", "services")), 5, "routers live")
            yield d
            assert set(d.stop_all().values()) == {0}
        finally:
            for name in list(d.procs):
                d.kill(name)
            for proc in servers + list(d.backends.values()):
                proc.kill()
    shutil.rmtree(work, ignore_errors=True)


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


def test_pgbench_initialises_and_runs_against_one_replica(dep):
    """pgbench by virtual address: ``-i`` creates its tables on the replica the client's
    connections go to, and the run that follows (4 clients, new connections) finds them
    there. Balanced connection by connection, the run would meet the other replica's
    empty database ("relation pgbench_branches does not exist")."""
    pg = ["-h", PG_ADDR, "-p", str(PG_PORT), "-U", "postgres", "postgres"]
    env = {**os.environ, "PGCONNECT_TIMEOUT": "5"}
    init = dep.topo.client.run(["pgbench", "-i", "-s", "1", "-q", *pg], check=False, timeout=120, env=env)
    assert init.returncode == 0, init.stdout[-1500:] + init.stderr[-1500:]
    run = dep.topo.client.run(["pgbench", "-c", "4", "-j", "2", "-t", "50", "-C", *pg],
                              check=False, timeout=120, env=env)
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-1500:]
    assert "number of failed transactions: 0" in run.stdout, run.stdout[-1500:]
    # the tables are on exactly one replica
    has_tables = []
    for i, sock in enumerate(dep.pg_sockets):
        r = dep.topo.servers[i].run(["psql", "-h", str(sock), "-p", str(PG_PORT), "-U", "postgres", "-tAc",
                                     "select count(*) from pgbench_branches"], check=False, timeout=30)
        has_tables.append(r.returncode == 0 and r.stdout.strip() == "1")
    assert sorted(has_tables) == [False, True], has_tables


def test_draining_wins_and_the_client_stays_when_its_replica_returns(dep):
    (home,) = replicas(dep, 20)
    i = int(home[3:])
    other = f"srv{1 - i}"
    dep.ctl(f"sgw{i}", "drain", service="web.svc.example")
    try:
        dep.wait_for(lambda: all(len(dep.ctl(r, "services")) == REGISTERED - 1 for r in ("r0", "r1")), 5,
                     f"{home} withdrawn")
        assert replicas(dep, 40) == {other: 40}            # draining wins over affinity
    finally:
        dep.ctl(f"sgw{i}", "drain", service="web.svc.example", cancel=True)
    dep.wait_for(lambda: all(len(dep.ctl(r, "services")) == REGISTERED for r in ("r0", "r1")), 5, f"{home} back")
    assert replicas(dep, 40) == {other: 40}                # an active client is not taken by a returning replica
