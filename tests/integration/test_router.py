"""Service routers with replicas, for real: namespaces, NFQUEUE, unmodified servers and
clients (lab.routed: BACKEND_PY answers its replica name or streams a seeded byte
stream; CLIENT_PY opens connections and reports which replica answered).

    client --- cgw ---+--- r0, r1 (service routers)
                      +--- sgw0 --- srv0 (weight 1)
                      +--- sgw1 --- srv1 (weight 3)

One deployment serves the whole module; every test leaves it healthy again.
Refresh 50 ms / hold 200 ms, router probes 50 ms x 3, backend checks 100 ms, rise/fall 2.
"""
import os
import sys
import time

import pytest

from lab.routed import (REPO, Knobs, RoutedDeployment, expected_sha256, run_client, start_backend,
                        start_client)
from lab.topologies import routed_replicas
from lab.topology import Lab
from sal import pcap, registration as reg
from sal.ip import aton

BIG, RATE = 6_000_000, 2_000_000      # a 3 s transfer


@pytest.fixture(scope="module")
def dep():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    with Lab() as lab:
        topo = routed_replicas(lab)
        d = RoutedDeployment(topo, Knobs())
        d.backends = {i: start_backend(topo.servers[i], f"srv{i}") for i in range(2)}
        try:
            d.start()
            d.wait_registered(2)
            yield d
            codes = d.stop_all()
            assert set(codes.values()) == {0}, {n: d.log(n) for n in codes}
        finally:
            for name in list(d.procs):
                d.kill(name)


@pytest.fixture
def healthy(dep):
    """Every daemon and backend up, both instances registered at both routers."""
    for i, proc in dep.backends.items():
        if proc.poll() is not None:
            dep.backends[i] = start_backend(dep.topo.servers[i], f"srv{i}")
    for name in dep.hosts:
        if name not in dep.procs:
            dep.launch(name)
            dep.wait_up(name)
    dep.wait_registered(2)
    dep.wait_for(lambda: all(r["health"] == "live" for r in dep.ctl("cgw", "services")), 5, "routers live")
    return dep


def split(dep, n, concurrency=16, timeout=3.0, request="ID") -> dict:
    return run_client(dep.topo.client, "split", n, concurrency, timeout, request)["counts"]


def assert_share(counts: dict, n: int, p: float = 0.25):
    """srv0's share of n connections is Binomial(n, p) with p = 1/(1+3): allow 5 standard
    deviations either side (a false failure about once in 1.7 million runs), and no
    failures at all."""
    sd = (n * p * (1 - p)) ** 0.5
    assert counts.get("srv0", 0) + counts.get("srv1", 0) == n, counts
    assert abs(counts.get("srv0", 0) - n * p) <= 5 * sd, (counts, f"expected {n * p:.0f} +- {5 * sd:.0f}")


def start_transfers(dep, want_on: str, count: int, seed: str, limit: int = 12) -> list:
    """Long transfers until ``count`` of them run on replica ``want_on`` (the choice is
    the router's: bounded attempts)."""
    mine, started = [], 0
    while len(mine) < count and started < limit:
        proc = start_client(dep.topo.client, "big", BIG, f"{seed}{started}", RATE)
        started += 1
        line = proc.stdout.readline()
        assert '"started"' in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        if f'"{want_on}"' in line:
            mine.append((proc, f"{seed}{started - 1}"))
    assert len(mine) == count, f"only {len(mine)} of {started} transfers landed on {want_on}"
    return mine


def assert_transfers_intact(transfers):
    import json
    for proc, seed in transfers:
        out, err = proc.communicate(timeout=60)
        done = json.loads(out.strip().splitlines()[-1])
        assert done["error"] == "" and done["bytes"] == BIG, (done, err)
        assert done["sha256"] == expected_sha256(BIG, seed)


def failover(dep, kill, seconds=2.5, kill_after=0.8, rate=200) -> dict:
    """A new connection every 5 ms, each given 0.5 s; ``kill()`` at ``kill_after``;
    returns the timeline around the kill."""
    loop = start_client(dep.topo.client, "loop", seconds, rate, 0.5)
    time.sleep(kill_after)
    t_kill = kill()
    import json
    out, err = loop.communicate(timeout=seconds + 30)
    attempts = json.loads(out)
    failed = [a for a in attempts if a[2] is None]
    after = [a for a in attempts if a[0] >= t_kill]
    return {"attempts": len(attempts), "failed": len(failed),
            "last_failure_ms": round((max(a[0] for a in failed) - t_kill) * 1000) if failed else None,
            "first_success_ms": round((min(a[1] for a in after if a[2]) - t_kill) * 1000),
            "late_failures": [a for a in failed if a[0] > t_kill + 1.0], "errors": sorted({a[3] for a in failed})}


def test_weights_1_and_3_split_2000_connections(healthy):
    dep = healthy
    def new_syns():      # a repeated SYN (the client's retransmission) is no new connection
        return sum(s.get("syn_forwarded", 0) - s.get("syn_repeated_same_instance", 0)
                   for s in (dep.ctl(r, "stats") for r in ("r0", "r1")))
    def redirected():    # SYNs the client sent again via the other router (a router looked dead)
        return dep.ctl("cgw", "stats").get("syns_redirected", 0)
    before, before_redirected = new_syns(), redirected()
    counts = split(dep, 2000)
    assert_share(counts, 2000)
    stats = {r: dep.ctl(r, "stats") for r in ("r0", "r1")}
    # the routers saw the SYNs and nothing else: data goes cgw <-> sgw directly
    assert new_syns() - before - (redirected() - before_redirected) == 2000, (stats, dep.ctl("cgw", "stats"))
    assert all(s.get("dropped_not_a_syn", 0) == 0 for s in stats.values()), stats
    assert all(s.get("syn_forwarded", 0) > 500 for s in stats.values())       # both routers used


def test_backend_killed_then_back(healthy):
    dep = healthy
    transfers = start_transfers(dep, "srv1", 2, "bk")

    def kill():
        dep.backends[0].kill()
        return time.monotonic()

    t = failover(dep, kill)
    print("backend kill:", t)
    assert not t["late_failures"], t
    assert t["last_failure_ms"] is None or t["last_failure_ms"] < 1000, t
    assert_transfers_intact(transfers)          # the other replica's flows never noticed
    dep.wait_registered(1)
    (row,) = dep.ctl("sgw0", "services")
    assert (row["health"], row["state"]) == ("down", "withdrawn")
    # recovery: the backend comes back, the gateway re-registers, it gets its share again
    dep.backends[0] = start_backend(dep.topo.servers[0], "srv0")
    dep.wait_registered(2)
    assert_share(split(dep, 400), 400)


def test_server_gateway_killed_then_back(healthy):
    dep = healthy
    transfers = start_transfers(dep, "srv1", 2, "gk")
    t = failover(dep, lambda: dep.kill("sgw0"))
    print("gateway kill:", t)
    assert not t["late_failures"], t
    assert t["last_failure_ms"] is None or t["last_failure_ms"] < 1000, t
    assert_transfers_intact(transfers)
    expired = sum(dep.ctl(r, "stats").get("registry_registrations_expired", 0) for r in ("r0", "r1"))
    assert expired >= 2          # noticed by missing refreshes, at both routers
    dep.launch("sgw0")           # after a crash: cleans up its rules, registers again
    dep.wait_up("sgw0")
    dep.wait_registered(2)
    assert_share(split(dep, 400), 400)


def test_drain_lets_running_transfers_finish(healthy):
    dep = healthy
    dep.ctl("sgw1", "drain", service="web.svc.example")       # steer the transfers to srv0
    dep.wait_registered(1)
    transfers = start_transfers(dep, "srv0", 2, "dr", limit=2)
    dep.ctl("sgw1", "drain", service="web.svc.example", cancel=True)
    dep.wait_registered(2)
    # the operator's command, as typed
    r = dep.topo.sgws[0].run([sys.executable, "-m", "serval", "ctl", "--socket", dep.socket("sgw0"),
                              "drain", "web.svc.example"], check=False, cwd=str(REPO))
    assert r.returncode == 0 and "draining" in r.stdout, r.stdout + r.stderr
    dep.wait_registered(1)
    assert split(dep, 300) == {"srv1": 300}               # no new connection reaches srv0
    (row,) = dep.ctl("sgw0", "services")
    assert row["state"] == "draining" and row["flows"] >= 2, row
    assert_transfers_intact(transfers)
    dep.ctl("sgw0", "drain", service="web.svc.example:80", cancel=True)
    dep.wait_registered(2)


def test_router_killed_clients_keep_connecting(healthy):
    dep = healthy
    t = failover(dep, lambda: dep.kill("r0"), seconds=2.0, kill_after=0.5)
    print("router kill:", t)
    assert not t["late_failures"], t
    assert t["failed"] <= 2, t        # SYNs sent to r0 before its death was noticed went on via r1
    assert dep.ctl("cgw", "stats").get("syns_redirected", 0) > 0
    rows = {r["next_hop"]: r for r in dep.ctl("cgw", "services")}
    assert rows["198.19.20.1"]["health"] == "down" and rows["198.19.21.1"]["health"] == "live"
    assert_share(split(dep, 400), 400)                  # all through r1 now
    dep.launch("r0")
    dep.wait_up("r0")
    dep.wait_registered(2)
    dep.wait_for(lambda: all(r["health"] == "live" for r in dep.ctl("cgw", "services")), 5, "r0 live again")
    split(dep, 100)
    assert dep.ctl("r0", "stats").get("syn_forwarded", 0) > 10      # and it is used again


def test_forged_and_replayed_registrations_are_refused(healthy):
    dep = healthy
    r0 = dep.topo.routers[0]
    capture = dep.dir / "register.pcap"
    dump = r0.popen(["tcpdump", "-U", "-c", "1", "-i", "eth0", "-w", str(capture),
                     f"udp dst port {reg.DEFAULT_PORT} and src host {dep.topo.sgw_sal(0)}"],
                    stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))
    dump.wait(10)
    (_, packet), = [p for p in pcap.read_pcap(capture.read_bytes()) if p[1]]
    genuine = packet[28:]
    assert reg.decode(genuine, bytes.fromhex(dep.key)).type == reg.REGISTER
    before = table(dep, "r0")
    stats0 = dep.ctl("r0", "stats")
    attacker_addr = aton(dep.topo.client_addr)
    forged = [
        genuine,                                                        # replayed as captured
        reg.encode(reg.Message(reg.REGISTER, time.time_ns(), "deployment", "sgw0-takeover", attacker_addr, 60000,
                               reg.decode(genuine, bytes.fromhex(dep.key)).records), os.urandom(32)),   # wrong key
        reg.Signer(reg.Key("other", os.urandom(32)), "x").message(reg.REGISTER, time.time_ns(), address=attacker_addr)[0],
        genuine[:-40] + bytes([genuine[-40] ^ 0xFF]) + genuine[-39:],    # tampered weight
    ]
    code = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(0.5)\n"
            "for h in sys.argv[2:]: s.sendto(bytes.fromhex(h),(sys.argv[1],%d))\n"
            "try:\n  s.recv(100); print('answered')\nexcept socket.timeout:\n  print('silent')\n" % reg.DEFAULT_PORT)
    r = dep.topo.client.run([sys.executable, "-c", code, dep.topo.router_addr(0), *(m.hex() for m in forged)],
                            check=False)
    assert r.stdout.strip() == "silent", r.stdout + r.stderr      # refused messages are never answered
    stats = dep.ctl("r0", "stats")
    refused = {k: stats.get(k, 0) - stats0.get(k, 0) for k in ("refused_replay", "refused_bad_mac", "refused_unknown_key")}
    assert refused == {"refused_replay": 1, "refused_bad_mac": 2, "refused_unknown_key": 1}, refused
    assert table(dep, "r0") == before
    assert split(dep, 100, timeout=3.0).keys() <= {"srv0", "srv1"}


def table(dep, router):
    return sorted((r["service"], r["instance"], r["sender"], r["weight"], r["priority"])
                  for r in dep.ctl(router, "services"))


def test_names_and_services_views(healthy):
    dep = healthy
    (name,) = dep.ctl("r1", "names")
    assert (name["name"], name["port"], name["instances"]) == ("web.svc.example", 80, 2)
    r = dep.topo.cgw.run([sys.executable, "-m", "serval", "ctl", "--socket", dep.socket("r1"), "services"],
                         check=False, cwd=str(REPO))
    assert r.returncode == 0 and dep.topo.sgw_sal(0) in r.stdout and "2 row(s)" in r.stdout, r.stdout + r.stderr


def test_clean_stop_unregisters_at_once(healthy):
    dep = healthy
    before = dep.ctl("r1", "stats")
    assert dep.stop("sgw1") == 0
    after = dep.ctl("r1", "stats")        # asked right away: no waiting for the hold time
    assert after.get("registry_unregistrations", 0) == before.get("registry_unregistrations", 0) + 1
    assert list(dep.instances("r1")) == [dep.topo.sgw_sal(0)]
    dep.launch("sgw1")
    dep.wait_up("sgw1")
    dep.wait_registered(2)


def test_restarted_gateway_meets_no_time_wait_at_its_backend(healthy):
    dep = healthy
    for request in ("CLOSE", None):      # a fresh pool; the backend closes first: TIME_WAIT there
        dep.kill("sgw0")
        dep.launch("sgw0")
        dep.wait_up("sgw0")
        dep.wait_registered(2)
        if request:
            split(dep, 200, request=request)
    counts = split(dep, 200, timeout=1.5)
    assert counts.get("srv0", 0) + counts.get("srv1", 0) == 200, counts


def test_udp_carriage_through_the_routers(requires_netns):
    """The same deployment carrying SAL over UDP: the routers forward SYNs arriving on
    UDP port 54325 (the inner checksum needs no change, the outer length grows)."""
    with Lab() as lab:
        topo = routed_replicas(lab)
        d = RoutedDeployment(topo, Knobs(carriage="udp"))
        for i in range(2):
            start_backend(topo.servers[i], f"srv{i}")
        try:
            d.start()
            d.wait_registered(2)
            assert_share(split(d, 400), 400)
            stats = [d.ctl(r, "stats") for r in ("r0", "r1")]
            assert sum(s.get("syn_forwarded", 0) for s in stats) >= 400
            assert not any(k.startswith("dropped_") and v for s in stats for k, v in s.items()), stats
            assert set(d.stop_all().values()) == {0}
        finally:
            for name in list(d.procs):
                d.kill(name)
