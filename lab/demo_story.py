"""The demo's story on the routed deployment (lab/demo_world.py): a name resolved, load
spread over replicas, a replica's failure, a client gateway changing address, and one
killed and restarted. Each step shows what happens, checks it, and measures it."""
from __future__ import annotations

import hashlib
import ipaddress
import re
import signal
import time
from collections import Counter
from pathlib import Path

from dns_resolver.lab import parse_dig
from lab.demo_report import Shown, check, note, show, wait_until
from lab.demo_world import RESOLVER, SLOW, Prober, World, replica_of, remove
from lab.routed import SERVICE, SERVICE_PORT
from sal.serviceid import service_id_for

VIRTUAL_NET = ipaddress.ip_network("198.18.0.0/16")
MB = 1024 * 1024


def _curl(world: World, *args, timeout: float = 30):
    return world.topo.client.run(["curl", "-sS", "-m", str(int(timeout)), *args], check=False, timeout=timeout + 30)


# --- name -------------------------------------------------------------------------------

NAME_TITLE = "an unmodified client resolves web.svc.example and loads the page by name"


def name(world: World) -> Shown:
    client = world.topo.client
    answers = {}
    for rtype in ("A", "TXT"):
        r = client.run(["dig", "+time=5", "+tries=3", SERVICE, rtype], check=False, timeout=SLOW)
        d = parse_dig(r.stdout, r.returncode)
        server = re.search(r";; SERVER: ([\d.]+)#(\d+)", r.stdout)
        note(f"$ dig {SERVICE} {rtype}      (on the client; answered by "
             f"{':'.join(server.groups()) if server else '?'})")
        for owner, ttl, t, data in d.answer:
            note(f"  {owner:20} {ttl:<4} IN {t:4} {data}")
        check(r.returncode == 0 and d.status == "NOERROR" and d.answer, f"dig {SERVICE} {rtype} got no answer "
              f"(status {d.status or '-'}, exit {r.returncode}): {r.stderr.strip()}")
        answers[rtype] = d
    addresses = answers["A"].values("A")
    check(len(addresses) == 1, f"dig {SERVICE} A gave {len(addresses)} addresses, not one: {addresses}")
    address = addresses[0]
    check(ipaddress.ip_address(address) in VIRTUAL_NET,
          f"the A record {address} is not a virtual address in {VIRTUAL_NET}")
    sid = service_id_for(SERVICE, SERVICE_PORT).hex()
    texts = " ".join(answers["TXT"].values("TXT"))
    check(f"id={sid}" in texts, f"the TXT record does not carry the serviceID {sid}: {texts}")
    note(f"a virtual address ({VIRTUAL_NET}) that the client gateway maps back to the serviceID in the TXT record")

    note(f"\n$ curl http://{SERVICE}/      (on the client)")
    r = _curl(world, "-w", "(from %{remote_ip}:%{remote_port})\n", f"http://{SERVICE}/")
    show(r)
    replica = replica_of(r.stdout)
    check(r.returncode == 0 and replica, f"curl by name failed (exit {r.returncode}): {r.stderr.strip()}")
    check(f"from {address}:80" in r.stdout, f"curl connected somewhere else than {address}")
    return Shown(f"{SERVICE} -> {address}, TXT id={sid[:8]}…{sid[-4:]}; page from {replica}",
                 [("resolver host", "serval dns --config dns.toml      # [[zone]] svc.example, [[zone.service]] web"),
                  ("client", f"dig {SERVICE} A; dig {SERVICE} TXT      # resolv.conf: nameserver {RESOLVER}"),
                  ("client", f"curl http://{SERVICE}/")])


# --- spread -----------------------------------------------------------------------------

SPREAD_TITLE = "twenty requests spread over two replicas by the service router"
REQUESTS = 20


def spread(world: World) -> Shown:
    note(f"$ for i in $(seq {REQUESTS}); do curl -s http://{SERVICE}/; done      (on the client)")
    r = world.topo.client.run(["sh", "-c", f"for i in $(seq {REQUESTS}); do curl -sS -m 10 http://{SERVICE}/ "
                               "|| echo FAILED; done"], check=False, timeout=SLOW * 2)
    pages = [line for line in r.stdout.splitlines() if line.strip()]
    counts = Counter(replica_of(p) or "failed" for p in pages)
    for replica in ("srv0", "srv1", "failed"):
        if counts[replica]:
            note(f"  {counts[replica]:3} x {'hello from replica ' + replica if replica != 'failed' else 'failed'}")
    check(counts["srv0"] + counts["srv1"] == REQUESTS,
          f"{counts['failed']} of {REQUESTS} requests failed: {r.stderr.strip()[-300:]}")
    check(counts["srv0"] and counts["srv1"], f"not spread over both replicas: {dict(counts)}")

    note(f"\n$ serval ctl --socket {world.dep.socket('r0')} services      (on the router)")
    show(world.ctl_cli("r0", "services"))
    rows = [row for row in world.dep.ctl("r0", "services") if row["service"] == SERVICE]
    check(len(rows) == 2, f"the router's table has {len(rows)} instance(s) of {SERVICE}, not 2")
    return Shown(f"{REQUESTS} requests: srv0 {counts['srv0']}, srv1 {counts['srv1']}, none failed",
                 [("router", "serval router --config router.toml            # [[key]]: the deployment's key"),
                  ("each server gateway", "serval gateway server --config server.toml    # [[service]], [routing]"),
                  ("client gateway", "serval gateway client --config client.toml    # mappings, [routing]"),
                  ("client", f"for i in $(seq {REQUESTS}); do curl -s http://{SERVICE}/; done | sort | uniq -c"),
                  ("router", "serval ctl --socket /run/serval/router.sock services")])


# --- failover ---------------------------------------------------------------------------

FAILOVER_TITLE = "one replica's server killed: new requests go to the other at once"
STREAK = 25          # consecutive new requests answered by the other replica: failed over


def _settled(results: list, t_kill: float) -> list:
    """The requests started after the kill and after the last one that srv1 did not
    answer: the unbroken run on the surviving replica."""
    after = [r for r in results if r["t0"] >= t_kill]
    bad = [i for i, r in enumerate(after) if r["replica"] != "srv1"]
    return after[bad[-1] + 1:] if bad else after


def failover(world: World) -> Shown:
    dep, backend = world.dep, world.backends[0]
    prober = Prober(world.topo.client)
    try:
        wait_until(lambda: sum(1 for r in prober.snapshot() if r["replica"]) >= 10,
                   "the probing client's first answers", SLOW)
        note("a client opening a new connection every 20 ms; then srv0's web server is killed (SIGKILL)")
        backend.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        backend.wait(SLOW)
        gone = {}

        def failed_over():
            if "router" not in gone and set(dep.instances("r0")) == {world.topo.sgw_sal(1)}:
                gone["router"] = time.monotonic()
            return "router" in gone and len(_settled(prober.snapshot(), t_kill)) >= STREAK

        wait_until(failed_over, f"{STREAK} new requests in a row answered by srv1", SLOW)
    finally:
        results = prober.stop()
    # counted again once every request has ended (one that was stuck may have failed late)
    settled = _settled(results, t_kill)
    check(len(settled) >= STREAK, f"only the last {len(settled)} requests went to srv1 when all had ended")
    after = [r for r in results if r["t0"] >= t_kill]
    failed = [r for r in results if r["t1"] >= t_kill and not r["replica"]]
    failover_ms = (settled[0]["t0"] - t_kill) * 1000
    router_ms = (gone["router"] - t_kill) * 1000
    errors = Counter(r["error"] for r in failed)
    note(f"  {len(after)} requests started after the kill: {len(failed)} failed "
         f"({', '.join(f'{n} {e}' for e, n in errors.items()) or 'none'}), "
         f"{sum(1 for r in after if r['replica'] == 'srv1')} answered by srv1")
    note(f"  srv0's gateway saw its backend down and withdrew it: the router dropped srv0 "
         f"{router_ms:.0f} ms after the kill")
    note(f"  every request started {failover_ms:.0f} ms after the kill or later went to srv1")
    check(not any(r["replica"] == "srv0" for r in after), "a request started after the kill was answered by srv0")

    note(f"\n$ serval ctl --socket {dep.socket('sgw0')} services      (on sgw0)")
    show(world.ctl_cli("sgw0", "services"))
    (row,) = dep.ctl("sgw0", "services")
    check((row["health"], row["state"]) == ("down", "withdrawn"),
          f"srv0's gateway says its backend is {row['health']}, {row['state']}, not down and withdrawn")
    t_back = time.monotonic()
    world.start_backend(0)
    dep.wait_registered(2, SLOW)
    back_ms = (time.monotonic() - t_back) * 1000
    note(f"srv0's web server started again: registered again {back_ms:.0f} ms later")
    return Shown(f"failover {failover_ms:.0f} ms ({len(failed)} failed), router updated in {router_ms:.0f} ms; "
                 f"srv0 back in {back_ms:.0f} ms",
                 [("replica srv0", "kill -9 <pid of the web server>"),
                  ("client", f"while :; do curl -s http://{SERVICE}/; done      # srv1 answers, at once"),
                  ("server gateway 0", "serval ctl --socket /run/serval/server.sock services  # down, withdrawn"),
                  ("router", "serval ctl --socket /run/serval/router.sock services  # srv1's gateway only")])


# --- move -------------------------------------------------------------------------------

MOVE_TITLE = "a long download while the client gateway's address is replaced"
NEW_ADDRESS = "198.19.10.11"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _finish(proc, what: str) -> None:
    wait_until(lambda: proc.poll() is not None, f"{what} to finish", 300)
    check(proc.returncode == 0, f"{what} failed (curl exit {proc.returncode}): {proc.stderr.read().strip()}")


def _same_file(world: World, path: Path, what: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    same = h.hexdigest() == world.blob_sha
    note(f"  sha256 {h.hexdigest()[:16]}… at the client, {world.blob_sha[:16]}… at the servers: "
         f"{'equal' if same else 'DIFFERENT'}")
    check(same, f"{what}: the file arrived with another SHA-256")


class ServerTcp:
    """The replicas' own TCP (their kernels, untouched by us): how many retransmission
    timeouts the legacy sender took, i.e. whether the connection ever stalled for one.
    (Neither a pause in the file's growth, which curl's --limit-rate makes by itself, nor
    the count of retransmitted segments, which fast retransmit runs up in a plain
    download here too, says as much.)"""

    def __init__(self, world: World):
        self.world = world
        self.start = self.timeouts()

    def timeouts(self) -> int:
        total = 0
        for host in self.world.topo.servers:
            text = host.run(["cat", "/proc/net/netstat"], timeout=SLOW).stdout.splitlines()
            for names, values in zip(text[::2], text[1::2]):
                row = dict(zip(names.split()[1:], values.split()[1:]))
                total += int(row.get("TCPTimeouts", 0))
        return total

    def since(self) -> int:
        return self.timeouts() - self.start


def move(world: World) -> Shown:
    cgw, dep = world.topo.cgw, world.dep
    ifname = "eth1"                                   # the client gateway's uplink, to core
    old = cgw.run(["ip", "-4", "-o", "addr", "show", "dev", ifname], timeout=SLOW).stdout.split()[3].split("/")[0]
    new = NEW_ADDRESS if old != NEW_ADDRESS else world.topo.cgw_sal
    before, tcp = dep.ctl("cgw", "stats"), ServerTcp(world)
    out = world.dir / "move.bin"
    note(f"$ curl --limit-rate 8M -o big.bin http://{SERVICE}/big.bin      (32 MB, on the client)")
    dl = world.download(out, "8M")
    try:
        wait_until(lambda: world.established_flow() and _size(out) >= 6 * MB, "6 MB of the download", SLOW)
        note(f"at {_size(out) / MB:.0f} MB: the client gateway's address {old} is replaced by {new}")
        cgw.run(["ip", "addr", "add", f"{new}/24", "dev", ifname], timeout=SLOW)
        cgw.run(["ip", "addr", "del", f"{old}/24", "dev", ifname], timeout=SLOW)
        moved = wait_until(lambda: dl.poll() is not None or dep.ctl("cgw", "stats").get("migrations_completed", 0)
                           > before.get("migrations_completed", 0), "the flow to move", SLOW)
        note(f"  moved at {_size(out) / MB:.0f} MB" if moved is True else "  (the download ended before the move)")
        _finish(dl, "the download")
    finally:
        if dl.poll() is None:
            dl.kill()
            dl.wait()
    stats = dep.ctl("cgw", "stats")
    moves = stats.get("migrations_completed", 0) - before.get("migrations_completed", 0)
    resets = stats.get("flows_reset", 0) - before.get("flows_reset", 0)
    gap = stats.get("migration_ms_last")
    note(f"  the download carried on to the end ({_size(out) / MB:.0f} MB): flows moved {moves}, reset {resets}")
    note(f"  migration gap (RSYN from the new address until the peer confirmed it): {gap} ms")
    rtos = tcp.since()
    note(f"  retransmission timeouts of the server's TCP meanwhile: {rtos}")
    _same_file(world, out, "the download")
    remove(out)
    check(moves >= 1, "the client gateway completed no migration")
    check(resets == 0, f"{resets} flow(s) were reset during the move")
    for line in dep.log("cgw").splitlines():
        if "now leave from" in line:
            note(f"  cgw log: {line.split(': ', 1)[-1]}")
    return Shown(f"migration gap {gap} ms, no flow reset, {rtos} RTO at the server, SHA-256 equal",
                 [("client", f"curl --limit-rate 8M -o big.bin http://{SERVICE}/big.bin &"),
                  ("client gateway", f"ip addr add {new}/24 dev {ifname}; ip addr del {old}/24 dev {ifname}"),
                  ("client gateway", "serval ctl --socket /run/serval/client.sock stats | grep migration"),
                  ("client", "wait; sha256sum big.bin")])


# --- restart ----------------------------------------------------------------------------

RESTART_TITLE = "the client gateway killed (kill -9) and restarted during a download"


def restart(world: World) -> Shown:
    dep = world.dep
    out = world.dir / "restart.bin"
    tcp = ServerTcp(world)
    # 3 MB/s: the download outlasts the restart by seconds even on a loaded machine
    note(f"$ curl --limit-rate 3M -o big.bin http://{SERVICE}/big.bin      (32 MB, on the client)")
    dl = world.download(out, "3M")
    try:
        flow = wait_until(world.established_flow, "the download's flow at the client gateway", SLOW)
        # the gateway writes its established flows to a snapshot every second: the kill
        # must come after the snapshot holds this flow
        wait_until(lambda: world.snapshot_has(flow["local_flow"]), "the flow in the gateway's snapshot", SLOW)
        t_kill = dep.kill("cgw")
        note(f"at {_size(out) / MB:.1f} MB: kill -9 of the client gateway (flow {flow['local_flow']}, "
             f"path {flow.get('path', '?')}); started again at once")
        dep.launch("cgw")
        dep.wait_up("cgw", SLOW)
        t_up = time.monotonic()
        running = dl.poll() is None
        held = [f for f in dep.ctl("cgw", "flows") if f["local_flow"] == flow["local_flow"]]
        _finish(dl, "the download")
    finally:
        if dl.poll() is None:
            dl.kill()
            dl.wait()
    resumed = re.findall(r"resumed (\d+) established flow", dep.log("cgw"))
    stats = dep.ctl("cgw", "stats")
    up_ms = (t_up - t_kill) * 1000
    note(f"  back up {up_ms:.0f} ms after the kill: "
         f"{'resumed ' + resumed[-1] + ' established flow(s) from its snapshot' if resumed else 'resumed nothing'}, "
         f"{stats.get('fastpath_adopted', 0)} adopted from the kernel fast path")
    if held:
        note(f"  the restarted gateway holds flow {held[0]['local_flow']} ({held[0]['state']}, "
             f"path {held[0].get('path', '?')}), the download still running")
    rtos = tcp.since()
    note(f"  the download completed ({_size(out) / MB:.0f} MB); retransmission timeouts of the server's TCP "
         f"meanwhile: {rtos}")
    _same_file(world, out, "the download")
    remove(out)
    check(running, "the download had finished before the gateway was back, so the restart was not shown "
                   f"(it took {up_ms:.0f} ms)")
    check(held and held[0]["state"] == "established",
          f"the restarted client gateway does not hold the download's flow {flow['local_flow']}")
    return Shown(f"back in {up_ms:.0f} ms, the flow resumed, {rtos} RTO at the server, SHA-256 equal",
                 [("client", f"curl --limit-rate 3M -o big.bin http://{SERVICE}/big.bin &"),
                  ("client gateway", "kill -9 $(pgrep -f 'serval gateway client')"),
                  ("client gateway", "serval gateway client --config client.toml    # resumed 1 established flow"),
                  ("client", "wait; sha256sum big.bin")])
