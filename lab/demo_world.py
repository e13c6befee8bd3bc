"""The routed deployment the demo's story steps share, built once on first use:

    client ── cgw (client gateway + resolver) ── core ──┬── r0 (service router)
                                                        ├── sgw0 ── srv0 (python http.server)
                                                        └── sgw1 ── srv1 (python http.server)

The client knows nothing of Serval: its resolv.conf names the resolver (on the client
gateway's LAN address), and it connects to whatever address a name resolves to. The client
gateway learns virtual addresses from the resolver's mappings file and sends every SYN to
the router, which picks a replica; data then goes straight between the gateways.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dns_resolver.lab import RunningResolver, resolver_config, wait_listening
from lab.demo_report import StepFailed, note, ruleset
from lab.routed import REPO, SERVICE, SERVICE_PORT, Knobs, RoutedDeployment
from lab.topologies import routed_replicas
from lab.topology import Lab

ZONE = "svc.example"
RESOLVER = "198.19.1.1"            # the client gateway's LAN address
BACKEND_PORT = 8080
BIG_BYTES = 32 * 1024 * 1024
# Timers for a loaded machine: refreshes every 0.2 s, forgotten after 1 s of silence (so
# a daemon held off the CPU for a moment is not taken for dead); backends checked every
# 0.1 s, down after two failed checks; the router probed every 0.2 s.
KNOBS = Knobs(weights=(1, 1), refresh=0.2, hold=1.0, probe=0.2, misses=3,
              health_interval=0.1, health_rise=2, health_fall=2)
SLOW = 60.0                        # seconds: how long a condition may take on a loaded machine


class NamedDeployment(RoutedDeployment):
    """A RoutedDeployment whose client gateway has no fixed service: it learns virtual
    addresses from the resolver's mappings file, and its SAL address follows its uplink
    (no ``sal_address``), as on a host whose address may change."""

    def __init__(self, topo, knobs: Knobs, mappings: Path):
        self.mappings = mappings
        super().__init__(topo, knobs)

    def _config(self, name: str, key_file: Path) -> str:
        if name != "cgw":
            return super()._config(name, key_file)
        return "\n".join(["[gateway]", f'instance = "{self.tag}-cgw"', f'carriage = "{self.knobs.carriage}"',
                          "queue = 0", f'control_socket = "{self.socket("cgw")}"',
                          f'mappings = "{self.mappings}"', ""] + self._routing(key_file))


class World:
    def __init__(self, ctx):
        self.ctx = ctx
        self.lab = self.topo = self.dep = self.resolver = None
        self.backends: dict[int, subprocess.Popen] = {}
        self.rules_before: dict[str, str] = {}

    # --- building ------------------------------------------------------------------------
    def build(self) -> "World":
        t0 = time.monotonic()
        self.dir = Path(tempfile.mkdtemp(prefix="serval-demo-"))
        self.ctx.cleanup_paths.append(self.dir)
        self.lab = Lab()
        self.ctx.track(self.lab)
        topo = self.topo = routed_replicas(self.lab, replicas=2, routers=1)
        self.ctx.track(self.lab)
        # hosts that segment and checksum their own TCP, as behind a NIC: the gateways'
        # kernel fast path then carries the established flows
        for host in (topo.client, *topo.servers):
            host.wire_like("eth0")
        # replacing the client gateway's address keeps its subnet (the move step)
        topo.cgw.sysctl("net.ipv4.conf.all.promote_secondaries", 1)
        note(f"{len(self.lab.hosts)} namespaces ({self.lab.prefix}-*): client, cgw, core, r0, sgw0, srv0, sgw1, srv1")

        self.blob = os.urandom(BIG_BYTES)
        self.blob_sha = hashlib.sha256(self.blob).hexdigest()
        (self.dir / "big.bin").write_bytes(self.blob)
        for i in range(2):
            www = self.dir / f"www{i}"
            www.mkdir()
            (www / "index.html").write_text(f"<p>hello from replica srv{i} ({topo.server_addr(i)})</p>\n")
            (www / "big.bin").symlink_to(self.dir / "big.bin")
            self.start_backend(i)
        note(f"replicas: python -m http.server {BACKEND_PORT} on srv0 {topo.server_addr(0)} "
             f"and srv1 {topo.server_addr(1)} (no route beyond their own subnet)")

        mappings = self.dir / "mappings.json"
        self.dep = NamedDeployment(topo, KNOBS, mappings)
        self.ctx.cleanup_paths.append(self.dep.dir)
        (self.dir / "dns").mkdir()
        self.resolver = RunningResolver(topo.cgw, resolver_config(
            listen=[RESOLVER], allow=["198.19.1.0/24"], zones={ZONE: [("web", (SERVICE_PORT,))]},
            upstreams=[], mappings=str(mappings), gateway_control=self.dep.socket("cgw")),
            str(self.dir / "dns"))
        self.resolver.start(timeout=SLOW)
        topo.client.write_etc("resolv.conf", f"nameserver {RESOLVER}\n")
        note(f"resolver: serval dns on {RESOLVER}:53, zone {ZONE}; the client's resolv.conf names it")

        note("the client gateway's config (no [[service]]: names come from the resolver, SYNs go to the router):")
        for line in self.dep.configs["cgw"].read_text().split("[routing.health]")[0].strip().splitlines():
            note(f"  | {line}")
        self.rules_before = {name: ruleset(host) for name, host in self.dep.hosts.items()}
        self.dep.start(timeout=SLOW)
        self.ready()
        note(f"daemons: serval router on r0 {topo.router_addr(0)}; serval gateway server on sgw0 "
             f"{topo.sgw_sal(0)} and sgw1 {topo.sgw_sal(1)}; serval gateway client on cgw {topo.cgw_sal}")
        note(f"both replicas registered with the router, the router live at the client gateway "
             f"({time.monotonic() - t0:.1f} s to build)")
        return self

    def start_backend(self, i: int) -> None:
        host = self.topo.servers[i]
        proc = host.popen([sys.executable, "-m", "http.server", str(BACKEND_PORT), "--bind", "0.0.0.0",
                           "-d", str(self.dir / f"www{i}")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(host, "0.0.0.0", BACKEND_PORT, "t", SLOW, proc)
        self.backends[i] = proc

    def ready(self) -> None:
        """Every daemon and backend up, both replicas registered, the router live: what
        each step starts from (a failed step before may have left something down)."""
        for i, proc in self.backends.items():
            if proc.poll() is not None:
                self.start_backend(i)
        for name in self.dep.hosts:
            proc = self.dep.procs.get(name)
            if proc is None or proc.poll() is not None:
                self.dep.procs.pop(name, None)
                self.dep.launch(name)
                self.dep.wait_up(name, SLOW)
        self.dep.wait_registered(2, SLOW)
        self.dep.wait_for(lambda: all(r["health"] == "live" for r in self.dep.ctl("cgw", "services")),
                          SLOW, "the router live at the client gateway")

    # --- used by the steps ---------------------------------------------------------------
    def ctl_cli(self, name: str, what: str) -> subprocess.CompletedProcess:
        """``serval ctl --socket … what`` as a user types it, in the daemon's namespace."""
        return self.dep.hosts[name].run([sys.executable, "-m", "serval", "ctl", "--socket", self.dep.socket(name),
                                         what], check=False, cwd=str(REPO), timeout=SLOW)

    def download(self, path: Path, rate: str) -> subprocess.Popen:
        """curl, by name, of the 32 MB file, at ``rate`` (curl's --limit-rate)."""
        self.ctx.cleanup_paths.append(path)
        return self.topo.client.popen(["curl", "-sS", "--fail", "-m", "300", "--limit-rate", rate, "-o", str(path),
                                       f"http://{SERVICE}/big.bin"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)

    def established_flow(self) -> dict | None:
        """The client gateway's one established flow carrying data, if any."""
        flows = [f for f in self.dep.ctl("cgw", "flows") if f["state"] == "established" and f["bytes_in"]]
        return flows[0] if flows else None

    def snapshot_has(self, local_flow: str) -> bool:
        """Whether the client gateway's flow snapshot (written every second) holds the flow."""
        for path in glob.glob(f"/run/serval/{self.dep.tag}-cgw.net*.flows.json"):
            try:
                with open(path) as f:
                    flows = json.load(f)["flows"]
            except (OSError, ValueError, KeyError):
                continue
            if any(f"{row['local_flow']:08x}" == local_flow.lower() for row in flows):
                return True
        return False

    def log_tails(self, lines: int = 6) -> None:
        if self.dep is None:
            return
        for name in self.dep.hosts:
            tail = [x for x in self.dep.log(name).splitlines() if x.strip()][-lines:]
            if tail:
                note(f"  {name} log:")
                for line in tail:
                    note(f"    {line}")

    # --- the end -------------------------------------------------------------------------
    def close(self) -> list[str]:
        """Stop everything (SIGTERM), tear the lab down; the problems found on the way."""
        problems = []
        try:
            if self.dep is not None:
                codes = self.dep.stop_all()
                bad = {n: c for n, c in codes.items() if c != 0}
                if bad:
                    problems.append(f"daemons exited non-zero on SIGTERM: {bad}")
                for name, before in self.rules_before.items():
                    if ruleset(self.dep.hosts[name]) != before:
                        problems.append(f"{name}: firewall rules left behind after the daemon stopped")
            if self.resolver is not None:
                code = self.resolver.stop()
                if code != 0:
                    problems.append(f"the resolver exited {code} on SIGTERM")
        finally:
            if self.lab is not None:
                self.lab.teardown()
        return problems


# --- a client that opens a new connection every few milliseconds (the failover step) ------

PROBER = r'''
import json, re, socket, sys, threading, time
name, port, every, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
addr = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
lock, stop = threading.Lock(), threading.Event()
def report(**row):
    with lock:
        print(json.dumps(row), flush=True)
def one(t0):
    try:
        with socket.create_connection((addr, port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: " + name.encode() + b"\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        m = re.search(rb"replica (srv\d)", data)
        report(t0=t0, t1=time.monotonic(), replica=m and m.group(1).decode(), error="" if m else "no page")
    except OSError as exc:
        report(t0=t0, t1=time.monotonic(), replica=None, error=type(exc).__name__)
def until_stdin_closes():
    sys.stdin.read()
    stop.set()
threading.Thread(target=until_stdin_closes, daemon=True).start()
# open loop: a stuck connection never delays the ones after it
start, threads = time.monotonic(), []
while not stop.is_set() and time.monotonic() - start < 120:
    threads.append(threading.Thread(target=one, args=(time.monotonic(),)))
    threads[-1].start()
    stop.wait(max(0.0, start + len(threads) * every - time.monotonic()))
for t in threads:
    t.join()
'''


class Prober:
    """PROBER in the client's namespace; its results read as they come."""

    def __init__(self, host, every: float = 0.02, timeout: float = 2.0):
        self.proc = host.popen([sys.executable, "-c", PROBER, SERVICE, str(SERVICE_PORT), str(every), str(timeout)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.results: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.results.append(json.loads(line))
            except ValueError:
                pass

    def snapshot(self) -> list[dict]:
        if self.proc.poll() is not None and not self._reader.is_alive():
            raise StepFailed(f"the probing client ended early: {self.proc.stderr.read()[-500:]}")
        return sorted(self.results, key=lambda r: r["t0"])

    def stop(self) -> list[dict]:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(SLOW)
        self._reader.join(SLOW)
        return sorted(self.results, key=lambda r: r["t0"])


def replica_of(page: str) -> str | None:
    m = re.search(r"replica (srv\d)", page)
    return m.group(1) if m else None


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
