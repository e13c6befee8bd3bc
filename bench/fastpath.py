"""The kernel fast path beside its alternatives, in one lab and one run: ``python -m bench.fastpath``.

    client 198.19.1.2 --- cgw --- sgw --- server 198.19.3.2

One lab, built with ``gateway_pair(lab, wire=True)``: the legacy client and server
segment and checksum their own TCP (TSO, GSO and TX checksum offload off on their veth
ends), as hosts behind a real wire do and as the fast path needs. The one phase that
wants a veth's full offloads turns them back on, on those two ends, for its own
duration (``ethtool -K ... tx on tso on gso on``) and puts the wire settings back
after it. Every figure is measured in this lab, one phase after the other, and every
ratio is against a baseline measured in the same run; nothing is asserted.

The servers, all in the server namespace, all started once: iperf3 (5201), the tiny
connect server ``bench/tiny_server.py`` (8081), memcached (11211), PostgreSQL (5432,
run as the postgres user, data in a temporary folder, fsync and synchronous commit off
so that the disk is not what is measured) and lighttpd serving a 1 KiB file (8088).
Through the gateway pair every one of them is a service on the virtual address
198.18.0.10 (iperf3 on port 80, the connect server on 81, the others on their own
port); through HAProxy and socat the client connects to sgw's address 198.19.2.2 on
the backend's port.

Phases, in order:

1. direct, full offloads: the client reaches the server directly, cgw and sgw plain
   kernel routers, the legacy ends with a veth's offloads (TSO, GSO, TX checksum on).
2. direct, the fast path's offloads: the same route with the wire settings, and GRO off
   on every interface of cgw and sgw, as the gateways set it there (a veth's GRO is
   off by default on recent kernels, so this usually changes nothing; the states found
   are printed). The direct application figures are measured here too. GRO goes back
   to what it was after.
3. HAProxy 2.6 (``mode tcp``, one ``listen`` per service) on sgw, no gateways running;
   GRO on sgw and cgw as the kernel left it (a proxy host would not turn it off).
   HAProxy ends TCP on sgw, so its own sockets toward the server and the client
   send with sgw's veth offloads (TSO): it can beat the routed direct path here.
4. socat (``TCP-LISTEN:...,fork TCP:server:5201``) on sgw, throughput only.
5. the gateway pair with ``fast_path = "off"``: every packet through Python.
6. the gateway pair with ``fast_path = "on"``: established flows translated by the
   tc-BPF program, ``fast_path_redirect`` as by default (``"auto"``: on here, where
   the gateway hosts have no packet filters but the gateways' own, so translated
   packets go straight to the next hop's interface, ``bpf_redirect`` after
   ``bpf_fib_lookup``). If the gateways refuse to start, the phase is reported failed.
7. the same with ``fast_path_redirect = false``: translated packets take the gateway
   hosts' routing and netfilter, as on a host with filters or NAT of its own.

Metrics (a ``_p4`` suffix: 4 parallel flows, ``iperf3 -P 4``; ``_reverse``: the server
sends, ``iperf3 -R``; ``_p4_reverse``: both):

``throughput_direct_full_offloads``
    iperf3 TCP client -> server:5201, phase 1. Receiver-side Gbit/s.
``throughput_direct_fastpath_offloads``
    The same in phase 2; baseline ``throughput_direct_full_offloads`` (the price of
    the wire settings themselves, before any gateway).
``throughput_gateway_pair_fastpath``
    iperf3 to 198.18.0.10:80 through the pair, fast path on (phase 6). Shown twice:
    against ``throughput_direct_fastpath_offloads`` and against
    ``throughput_gateway_pair_slowpath`` (what the kernel program gains over Python).
``throughput_gateway_pair_fastpath_stack``
    The same with ``fast_path_redirect = false`` (phase 7); baseline
    ``throughput_direct_fastpath_offloads``.
``throughput_gateway_pair_slowpath``
    The same with the fast path off; baseline ``throughput_direct_fastpath_offloads``.
``throughput_client_gateway_host_fastpath``, ``throughput_client_gateway_host_slowpath``
    One iperf3 flow from the client gateway's own host (``intercept_local``, the client
    container of docker-compose), fast path on and off; baselines the slow path and the
    LAN client's ``throughput_gateway_pair_fastpath``.
``throughput_haproxy``, ``throughput_socat``
    iperf3 to 198.19.2.2:5201, HAProxy or socat on sgw relaying to the server;
    baseline ``throughput_direct_fastpath_offloads``.
``memcached_ops_<path>``
    ``memcaslap`` (memaslap as Debian's libmemcached-tools ships it: 2 threads, 16
    connections, 90 % get / 10 % set) for ``--app-seconds``; operations per second.
``pgbench_tps_<path>``
    ``pgbench`` TPC-B, scale 4 (2 with --quick), 4 clients, 2 threads, for
    ``--app-seconds``; transactions per second without the initial connection time.
``ab_keepalive_rps_<path>``
    ``ab -k -c 8`` fetching the 1 KiB file for ``--app-seconds``; requests per second.
``connect_p50_<path>``, ``connect_p99_<path>``
    ``--connects`` sequential connects to the tiny server (``bench/probe.py latency``),
    in ms. Through HAProxy the connect completes at HAProxy, not at the server.
    The direct path is called ``direct_wire`` here (``connect_p50_direct`` belongs to
    ``bench.run``); through the pair ``gateway_fastpath`` and ``gateway_slowpath``.
    <path> for the application figures is ``direct`` (phase 2), ``haproxy``,
    ``gateway_pair_fastpath``, ``gateway_pair_fastpath_stack``, ``gateway_pair_slowpath``;
    each has the direct figure as its baseline.
``memcached_ops_ratio``, ``pgbench_tps_ratio``, ``ab_keepalive_ratio``
    The pair with the fast path over direct, as a value of its own.
``gateway_pair_fastpath_kernel_packets``, ``gateway_pair_fastpath_kernel_passed``
    After phase 6: packets the kernel program translated (both gateways, both
    directions), and packets it passed up to Python (SYNs, FINs, super-packets, ...).
    Few translated means the fast path did not carry the traffic.
``gateway_pair_fastpath_redirected``
    After phase 6: of the translated packets, those handed straight to the next hop.
``fastpath_bench_failed_steps``
    How many steps failed, and which (``failures``).

A step that fails (a tool missing, a server that does not start, an iperf3 error,
gateways that do not start or exit uncleanly, a gateway internal error) is reported
when it happens and listed at the end; the other steps still run, its metrics are
written with value null, and the run exits 1. Prints a table (metric, value, unit,
baseline, ratio = value / baseline's value) and merges the records into
``build/bench.json``. ``--quick`` is a trial run of about 1.5 minutes; the default
run takes about 3.5 (on 2 cores). The lab is always torn down.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.records import BENCH_JSON
from bench.run import GBIT, BenchError, iperf3_end, wait_line, wait_port
from bench.steps import Steps, finish
from lab import postgres
from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import GatewayPair, gateway_pair
from lab.topology import Host, Lab

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"

IPERF_PORT, IPERF_SERVICE_PORT = 5201, 80
TINY_PORT, TINY_SERVICE_PORT = 8081, 81
MEMCACHED_PORT = 11211
PG_PORT = 5432
HTTP_PORT = 8088
HTTP_FILE = "small.txt"
# the pair's services besides iperf3 (web.svc.example, port 80): (name, port, virtual address, backend port)
EXTRA_SERVICES = [
    ("echo.svc.example", TINY_SERVICE_PORT, VIRTUAL_ADDR, TINY_PORT),
    ("memcached.svc.example", MEMCACHED_PORT, VIRTUAL_ADDR, MEMCACHED_PORT),
    ("pg.svc.example", PG_PORT, VIRTUAL_ADDR, PG_PORT),
    ("http.svc.example", HTTP_PORT, VIRTUAL_ADDR, HTTP_PORT),
]
# iperf3 variants: metric suffix, parallel flows, reverse
VARIANTS = (("", 1, False), ("_p4", 4, False), ("_reverse", 1, True), ("_p4_reverse", 4, True))
APPS = (("memcached_ops", "ops/s", "memcached_ops_ratio"),
        ("pgbench_tps", "tps", "pgbench_tps_ratio"),
        ("ab_keepalive_rps", "req/s", "ab_keepalive_ratio"))
APP_PATHS = ("direct", "haproxy", "gateway_pair_slowpath", "gateway_pair_fastpath",
             "gateway_pair_fastpath_stack")
CONNECT_PATHS = {"direct": "direct_wire", "haproxy": "haproxy",
                 "gateway_pair_slowpath": "gateway_slowpath", "gateway_pair_fastpath": "gateway_fastpath",
                 "gateway_pair_fastpath_stack": "gateway_fastpath_stack"}


T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[bench.fastpath {time.monotonic() - T0:5.0f} s] {msg}", flush=True)


# --- measurements, all from the client namespace -------------------------------------------

def iperf(client: Host, addr: str, port: int, seconds: int, streams: int, reverse: bool) -> float:
    """Receiver-side Gbit/s of an iperf3 TCP test."""
    return iperf3_end(client, addr, port, seconds, streams, reverse)["sum_received"]["bits_per_second"] / GBIT


def memcached_ops(client: Host, addr: str, port: int, seconds: int) -> float:
    tool = shutil.which("memcaslap") or shutil.which("memaslap")
    if tool is None:
        raise BenchError("memcaslap is not installed (make bench-deps: libmemcached-tools)")
    r = client.run([tool, "-s", f"{addr}:{port}", "-t", f"{seconds}s", "-T", "2", "-c", "16"],
                   check=False, timeout=seconds + 30)
    m = re.search(r"TPS:\s*(\d+)", r.stdout)
    if r.returncode or not m or int(m.group(1)) == 0:
        raise BenchError(f"memcaslap to {addr}:{port}: exit {r.returncode}: {(r.stdout + r.stderr)[-400:]}")
    return float(m.group(1))


def pgbench_tps(client: Host, addr: str, port: int, seconds: int) -> float:
    r = client.run(["pgbench", "-h", addr, "-p", str(port), "-U", "postgres", "-T", str(seconds),
                    "-c", "4", "-j", "2", "postgres"], check=False, timeout=seconds + 60,
                   env={**os.environ, "PGCONNECT_TIMEOUT": "5"})
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", r.stdout)
    if r.returncode or not m:
        raise BenchError(f"pgbench to {addr}:{port}: exit {r.returncode}: {(r.stdout + r.stderr)[-400:]}")
    return float(m.group(1))


def ab_keepalive(client: Host, addr: str, port: int, seconds: int) -> float:
    r = client.run(["ab", "-k", "-q", "-c", "8", "-t", str(seconds), "-n", "10000000", "-s", "10",
                    f"http://{addr}:{port}/{HTTP_FILE}"], check=False, timeout=seconds + 30)
    m = re.search(r"Requests per second:\s+([\d.]+)", r.stdout)
    if r.returncode or not m:
        raise BenchError(f"ab to {addr}:{port}: exit {r.returncode}: {(r.stdout + r.stderr)[-400:]}")
    failed = re.search(r"Failed requests:\s+(\d+)", r.stdout)
    if failed and int(failed.group(1)):
        progress(f"ab to {addr}:{port}: {failed.group(1)} failed requests")
    return float(m.group(1))


def connect_latency(client: Host, addr: str, port: int, count: int) -> dict:
    r = client.run([sys.executable, str(BENCH / "probe.py"), "latency", addr, str(port),
                    "--count", str(count), "--max-seconds", "60"], check=False, timeout=90)
    if r.returncode:
        raise BenchError(f"probe latency {addr}:{port}: exit {r.returncode}: {r.stderr[-400:]}")
    result = json.loads(r.stdout)
    if result["n"] == 0:
        raise BenchError(f"no connection to {addr}:{port} succeeded: {result['errors']}")
    if result["failures"]:
        progress(f"{result['failures']} of {count} connects to {addr}:{port} failed: {result['errors']}")
    return result


# --- interface features ---------------------------------------------------------------------

def features(host: Host, ifname: str) -> dict[str, str]:
    """``ethtool -k``: feature name -> "on" / "off"."""
    out = host.run(["ethtool", "-k", ifname]).stdout
    feats = {}
    for line in out.splitlines()[1:]:
        name, _, value = line.strip().partition(":")
        if value:
            feats[name] = value.split()[0]
    return feats


def expect_feature(host: Host, ifname: str, name: str, value: str) -> None:
    got = features(host, ifname).get(name)
    if got != value:
        raise BenchError(f"{host.name}/{ifname}: {name} is {got}, wanted {value}")


# --- the servers, on the server host --------------------------------------------------------

class Servers:
    """The backends, each started once by its own step; ``need`` fails a step whose
    backend did not start."""

    def __init__(self, pair: GatewayPair, work: Path, quick: bool):
        self.pair, self.work, self.quick = pair, work, quick
        self.up: set[str] = set()
        self.iperf_proc = None

    def need(self, name: str) -> None:
        if name not in self.up:
            raise BenchError(f"{name} is not running (its start failed)")

    def start_all(self, steps: Steps) -> None:
        for name, fn in (("iperf3", self.start_iperf), ("tiny", self.start_tiny),
                         ("memcached", self.start_memcached), ("postgres", self.start_postgres),
                         ("lighttpd", self.start_lighttpd)):
            if steps.step(f"starting {name} on the server", fn):
                self.up.add(name)

    def start_iperf(self) -> dict:
        self.iperf_proc = self.pair.server.popen(["iperf3", "-s", "-p", str(IPERF_PORT)],
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.pair.server, IPERF_PORT)
        return {}

    def restart_iperf(self) -> None:
        """After a failed test the iperf3 server may still be busy with it."""
        if self.iperf_proc is not None and self.iperf_proc.poll() is None:
            self.iperf_proc.kill()
            self.iperf_proc.wait()
        time.sleep(0.2)
        self.start_iperf()

    def start_tiny(self) -> dict:
        tiny = self.pair.server.popen([sys.executable, str(BENCH / "tiny_server.py"), str(TINY_PORT)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_line(tiny, "ready", 10, "tiny server")
        return {}

    def start_memcached(self) -> dict:
        if shutil.which("memcached") is None:
            raise BenchError("memcached is not installed (make bench-deps)")
        self.pair.server.popen(["memcached", "-u", "nobody", "-l", self.pair.server_addr,
                                "-p", str(MEMCACHED_PORT), "-U", "0", "-t", "2", "-m", "256"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.pair.server, MEMCACHED_PORT)
        return {}

    def start_postgres(self) -> dict:
        try:
            sock = postgres.start(self.pair.server, self.work, self.pair.server_addr, PG_PORT)
        except postgres.PostgresUnavailable as exc:
            raise BenchError(f"{exc} (make bench-deps)") from None
        scale = "2" if self.quick else "4"
        r = self.pair.server.run(["pgbench", "-i", "-q", "-s", scale, "-h", str(sock), "-p", str(PG_PORT),
                                  "-U", "postgres", "postgres"], check=False, timeout=120)
        if r.returncode:
            raise BenchError(f"pgbench -i: exit {r.returncode}: {(r.stdout + r.stderr)[-400:]}")
        return {}

    def start_lighttpd(self) -> dict:
        if shutil.which("lighttpd") is None:
            raise BenchError("lighttpd is not installed (make bench-deps)")
        www = self.work / "www"
        www.mkdir()
        (www / HTTP_FILE).write_text("x" * 1023 + "\n")
        conf = self.work / "lighttpd.conf"
        conf.write_text(f'server.document-root = "{www}"\n'
                        f'server.bind = "{self.pair.server_addr}"\n'
                        f"server.port = {HTTP_PORT}\n"
                        f'server.errorlog = "{self.work / "lighttpd.log"}"\n'
                        "server.max-keep-alive-requests = 1000000\n"
                        "server.max-keep-alive-idle = 60\n")
        self.pair.server.popen(["lighttpd", "-D", "-f", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.pair.server, HTTP_PORT)
        return {}


# --- the run --------------------------------------------------------------------------------

class FastPathBench:
    def __init__(self, args, lab: Lab, work: Path):
        self.args, self.lab, self.work = args, lab, work
        self.steps = Steps(progress)
        self.pair: GatewayPair | None = None
        self.servers: Servers | None = None

    # paths: each measures what it can reach; guard fails the remaining steps of a phase
    def throughput(self, label: str, addr: str, port: int, guard=None) -> None:
        s = self.args.seconds
        for suffix, streams, reverse in VARIANTS:
            metric = f"throughput_{label}{suffix}"
            how = f"-P {streams}" + (" -R" if reverse else "")

            def measure(metric=metric, streams=streams, reverse=reverse):
                self.servers.need("iperf3")
                return {metric: iperf(self.pair.client, addr, port, s, streams, reverse)}

            if not self.steps.step(f"{metric}: iperf3 {how} -t {s} to {addr}:{port}", measure, guard):
                if "iperf3" in self.servers.up:
                    try:
                        self.servers.restart_iperf()
                    except BenchError as exc:
                        progress(f"iperf3 server did not restart: {exc}")
                        self.servers.up.discard("iperf3")

    def apps(self, path: str, addr: str, ports: dict[str, int], guard=None) -> None:
        s, client = self.args.app_seconds, self.pair.client

        def run(server, fn, metric, port):
            def measure():
                self.servers.need(server)
                return {metric: fn(client, addr, port, s)}
            return measure

        self.steps.step(f"memcached_ops_{path}: memcaslap -t {s}s to {addr}:{ports['memcached']}",
                        run("memcached", memcached_ops, f"memcached_ops_{path}", ports["memcached"]), guard)
        self.steps.step(f"pgbench_tps_{path}: pgbench -T {s} -c 4 to {addr}:{ports['pg']}",
                        run("postgres", pgbench_tps, f"pgbench_tps_{path}", ports["pg"]), guard)
        self.steps.step(f"ab_keepalive_rps_{path}: ab -k -c 8 -t {s} to {addr}:{ports['http']}",
                        run("lighttpd", ab_keepalive, f"ab_keepalive_rps_{path}", ports["http"]), guard)
        label = CONNECT_PATHS[path]

        def latency():
            self.servers.need("tiny")
            r = connect_latency(client, addr, ports["tiny"], self.args.connects)
            return {f"connect_p50_{label}": r["p50_ms"], f"connect_p99_{label}": r["p99_ms"]}

        self.steps.step(f"connect_p50/p99_{label}: {self.args.connects} connects to {addr}:{ports['tiny']}",
                        latency, guard)

    def own_connection(self, label: str, guard) -> None:
        """One iperf3 flow from the client gateway's own host (intercept_local: the
        client container beside the gateway in docker-compose)."""
        s, metric = self.args.seconds, f"throughput_{label}"

        def measure():
            self.servers.need("iperf3")
            return {metric: iperf(self.pair.cgw, VIRTUAL_ADDR, IPERF_SERVICE_PORT, s, 1, False)}

        self.steps.step(f"{metric}: iperf3 -t {s} from cgw itself to {VIRTUAL_ADDR}:{IPERF_SERVICE_PORT}",
                        measure, guard)

    def backend_ports(self) -> dict[str, int]:
        return {"memcached": MEMCACHED_PORT, "pg": PG_PORT, "http": HTTP_PORT, "tiny": TINY_PORT}

    def direct_full_offloads(self) -> None:
        pair = self.pair
        ends = ((pair.client, pair.client_if), (pair.server, pair.server_if))

        def offloads_on():
            for host, ifname in ends:
                host.run(["ethtool", "-K", ifname, "tx", "on", "tso", "on", "gso", "on"])
                expect_feature(host, ifname, "tcp-segmentation-offload", "on")
            return {}

        if self.steps.step("phase 1, direct with full offloads: TSO/GSO/TX checksum on at the legacy ends",
                           offloads_on):
            self.throughput("direct_full_offloads", pair.server_addr, IPERF_PORT)

        def wire_again():
            for host, ifname in ends:
                host.wire_like(ifname)
                expect_feature(host, ifname, "tcp-segmentation-offload", "off")
            return {}

        if not self.steps.step("legacy ends back to the wire settings (TSO/GSO/TX checksum off)", wire_again):
            raise BenchError("the legacy ends could not be set back to the wire settings, so the "
                             "other phases would not measure what they say: stopping here")

    def direct_fastpath_offloads(self) -> None:
        pair = self.pair
        before: dict[tuple[Host, str], str] = {}

        def gro_off():
            for host in (pair.cgw, pair.sgw):
                for ifname in host.ifaces:
                    before[(host, ifname)] = features(host, ifname).get("generic-receive-offload", "off")
                    host.run(["ethtool", "-K", ifname, "gro", "off"])
                    expect_feature(host, ifname, "generic-receive-offload", "off")
            progress("GRO before: " + ", ".join(f"{h.name}/{i} {v}" for (h, i), v in before.items()))
            return {}

        try:
            if self.steps.step("phase 2, direct with the fast path's offloads: GRO off on cgw and sgw", gro_off):
                self.throughput("direct_fastpath_offloads", pair.server_addr, IPERF_PORT)
                self.apps("direct", pair.server_addr, self.backend_ports())
        finally:
            for (host, ifname), state in before.items():
                host.run(["ethtool", "-K", ifname, "gro", state], check=False)

    def haproxy(self) -> None:
        pair, proxy = self.pair, self.pair.sgw_sal
        ports = self.backend_ports()
        proc = None

        def start():
            nonlocal proc
            if shutil.which("haproxy") is None:
                raise BenchError("haproxy is not installed (make bench-deps)")
            conf = self.work / "haproxy.cfg"
            lines = ["global", "    maxconn 4000", "defaults", "    mode tcp", "    timeout connect 5s",
                     "    timeout client 2m", "    timeout server 2m"]
            for name, port in (("iperf3", IPERF_PORT), *ports.items()):
                lines += [f"listen {name}", f"    bind {proxy}:{port}",
                          f"    server backend {pair.server_addr}:{port}"]
            conf.write_text("\n".join(lines) + "\n")
            check = pair.sgw.run(["haproxy", "-c", "-f", str(conf)], check=False)
            if check.returncode:
                raise BenchError(f"haproxy -c: {(check.stdout + check.stderr)[-400:]}")
            proc = pair.sgw.popen(["haproxy", "-db", "-f", str(conf)],
                                  stdout=open(self.work / "haproxy.log", "w"), stderr=subprocess.STDOUT)
            for port in (IPERF_PORT, *ports.values()):
                wait_port(pair.sgw, port)
            return {}

        def alive():
            if proc.poll() is not None:
                raise BenchError(f"haproxy exited {proc.returncode}: "
                                 + (self.work / "haproxy.log").read_text()[-400:])

        try:
            if self.steps.step(f"phase 3, HAProxy (mode tcp) on sgw {proxy}", start):
                self.throughput("haproxy", proxy, IPERF_PORT, alive)
                self.apps("haproxy", proxy, ports, alive)
        finally:
            stop(proc)

    def socat(self) -> None:
        pair, proxy = self.pair, self.pair.sgw_sal
        proc = None

        def start():
            nonlocal proc
            if shutil.which("socat") is None:
                raise BenchError("socat is not installed (make bench-deps)")
            proc = pair.sgw.popen(["socat", f"TCP-LISTEN:{IPERF_PORT},bind={proxy},reuseaddr,fork,backlog=128",
                                   f"TCP:{pair.server_addr}:{IPERF_PORT}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(pair.sgw, IPERF_PORT)
            return {}

        def alive():
            if proc.poll() is not None:
                raise BenchError(f"socat exited {proc.returncode}")

        try:
            if self.steps.step(f"phase 4, socat (fork) on sgw {proxy}", start):
                self.throughput("socat", proxy, IPERF_PORT, alive)
        finally:
            stop(proc)

    def gateway_pair(self, mode: str, stack: bool = False) -> None:
        """``stack``: fast_path_redirect = false; else as configured by default."""
        tag = ("fastpath_stack" if stack else "fastpath") if mode == "on" else "slowpath"
        phase = (7 if stack else 6) if mode == "on" else 5
        gws = RunningGateways(self.pair, carriage="ip", backend_port=IPERF_PORT,
                              service_port=IPERF_SERVICE_PORT, extra_services=EXTRA_SERVICES, fast_path=mode)
        if stack:
            for path in gws.configs.values():
                path.write_text(path.read_text().replace("[gateway]\n", "[gateway]\nfast_path_redirect = false\n", 1))
        ports = {"memcached": MEMCACHED_PORT, "pg": PG_PORT, "http": HTTP_PORT, "tiny": TINY_SERVICE_PORT}

        def start():
            gws.start()
            stats = {role: gws.stats(role) for role in ("client", "server")}
            states = {role: s.get("fastpath") for role, s in stats.items()}
            progress(f"gateways up, fastpath: {states}, redirect: "
                     f"{ {role: s.get('fastpath_redirect') for role, s in stats.items()} }")
            wanted = "on" if mode == "on" else "off"
            if any(s != wanted for s in states.values()):
                raise BenchError(f"fast_path = {mode!r} but the gateways report {states}")
            return {}

        def alive():
            for role, proc in gws.procs.items():
                if proc.poll() is not None:
                    raise BenchError(f"{role} gateway exited {proc.returncode}: {gws.log(role)[-400:]}")

        def finish():
            stats = {role: gws.stats(role) for role in ("client", "server")}
            out = {}
            if mode == "on" and not stack:
                out["gateway_pair_fastpath_kernel_packets"] = sum(
                    s.get("fastpath_to_sal", 0) + s.get("fastpath_from_sal", 0) for s in stats.values())
                out["gateway_pair_fastpath_redirected"] = sum(s.get("fastpath_redirected", 0) for s in stats.values())
                out["gateway_pair_fastpath_kernel_passed"] = sum(
                    v for s in stats.values() for k, v in s.items() if k.startswith("fastpath_passed_"))
            errors = [f"{role} gateway: internal_errors={s['internal_errors']}"
                      for role, s in stats.items() if s.get("internal_errors")]
            for role, s in stats.items():
                drops = {k: v for k, v in s.items() if k.startswith("dropped_") and v}
                if drops:
                    progress(f"{role} gateway drops: {drops}")
            if errors:
                raise BenchError("; ".join(errors))
            return out

        started = False
        try:
            started = self.steps.step(f"phase {phase}, the gateway pair with fast_path = \"{mode}\""
                                      + (", fast_path_redirect = false" if stack else "") + " (carriage ip)", start)
            if started:
                self.throughput(f"gateway_pair_{tag}", VIRTUAL_ADDR, IPERF_SERVICE_PORT, alive)
                if not stack:
                    self.own_connection(f"client_gateway_host_{tag}", alive)
                self.apps(f"gateway_pair_{tag}", VIRTUAL_ADDR, ports, alive)
                self.steps.step(f"gateway counters (fast_path = \"{mode}\")", finish, alive)
        finally:
            codes = gws.stop()
            bad = {role: code for role, code in codes.items() if code != 0}
            if bad and started:             # a failed start is already reported, with its log
                self.steps.failures.append((f"gateway pair fast_path={mode} stop",
                                            f"gateways exited {bad}"))
                for role in bad:
                    progress(f"{role} gateway exited {bad[role]}; its log:\n{gws.log(role)}")
            shutil.rmtree(gws.dir, ignore_errors=True)

    def run(self) -> Steps:
        progress(f"building the lab {self.lab.prefix}-*: client --- cgw --- sgw --- server, wire-like legacy ends")
        self.pair = gateway_pair(self.lab, server_route_back=True, wire=True)
        self.servers = Servers(self.pair, self.work, self.args.quick)
        self.servers.start_all(self.steps)
        self.direct_full_offloads()
        self.direct_fastpath_offloads()
        self.haproxy()
        self.socat()
        self.gateway_pair("off")
        self.gateway_pair("on")
        self.gateway_pair("on", stack=True)
        return self.steps


def stop(proc) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- records and the table ------------------------------------------------------------------

def records(steps: Steps) -> list[dict]:
    values = steps.values
    out: list[dict] = []

    def add(metric: str, unit: str, baseline: str | None = None, value=None) -> None:
        if value is None:
            value = values.get(metric)
        ratio = None
        if baseline is not None and value is not None and values.get(baseline):
            ratio = value / values[baseline]
        rec = {"metric": metric, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio}
        if value is None:
            rec["error"] = "not measured: a step failed"
        out.append(rec)

    for suffix, _, _ in VARIANTS:
        direct = f"throughput_direct_fastpath_offloads{suffix}"
        slow = f"throughput_gateway_pair_slowpath{suffix}"
        add(f"throughput_direct_full_offloads{suffix}", "Gbit/s")
        add(direct, "Gbit/s", f"throughput_direct_full_offloads{suffix}")
        add(f"throughput_gateway_pair_fastpath{suffix}", "Gbit/s", direct)
        add(f"throughput_gateway_pair_fastpath{suffix}", "Gbit/s", slow)
        add(f"throughput_gateway_pair_fastpath_stack{suffix}", "Gbit/s", direct)
        add(slow, "Gbit/s", direct)
        add(f"throughput_haproxy{suffix}", "Gbit/s", direct)
        add(f"throughput_socat{suffix}", "Gbit/s", direct)
    add("throughput_client_gateway_host_slowpath", "Gbit/s")
    add("throughput_client_gateway_host_fastpath", "Gbit/s", "throughput_client_gateway_host_slowpath")
    add("throughput_client_gateway_host_fastpath", "Gbit/s", "throughput_gateway_pair_fastpath")
    for app, unit, ratio_name in APPS:
        for path in APP_PATHS:
            add(f"{app}_{path}", unit, None if path == "direct" else f"{app}_direct")
        fast, direct = values.get(f"{app}_gateway_pair_fastpath"), values.get(f"{app}_direct")
        add(ratio_name, "fastpath/direct", value=fast / direct if fast is not None and direct else None)
    for q in ("p50", "p99"):
        for path in APP_PATHS:
            label = CONNECT_PATHS[path]
            add(f"connect_{q}_{label}", "ms", None if path == "direct" else f"connect_{q}_direct_wire")
    add("gateway_pair_fastpath_kernel_packets", "packets")
    add("gateway_pair_fastpath_kernel_passed", "packets")
    add("gateway_pair_fastpath_redirected", "packets")
    out.append({"metric": "fastpath_bench_failed_steps", "value": len(steps.failures), "unit": "steps",
                "baseline": None, "ratio": None,
                "failures": [f"{name}: {why}" for name, why in steps.failures]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fastpath", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=None, help="iperf3 duration per throughput step (default 5)")
    ap.add_argument("--app-seconds", type=int, default=None,
                    help="duration of each memcached, pgbench and ab step (default 6)")
    ap.add_argument("--connects", type=int, default=None, help="sequential connects per latency step (default 1000)")
    ap.add_argument("--quick", action="store_true",
                    help="a trial run of about 1.5 minutes: 2 s steps, 200 connects (explicit options win)")
    ap.add_argument("--json", default=str(BENCH_JSON), help="records file to merge into")
    args = ap.parse_args(argv)
    quick = {"seconds": 2, "app_seconds": 2, "connects": 200}
    full = {"seconds": 5, "app_seconds": 6, "connects": 1000}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not (1 <= args.seconds <= 30 and 1 <= args.app_seconds <= 60 and 10 <= args.connects <= 5000):
        ap.error("keep the steps small: seconds 1..30, app-seconds 1..60, connects 10..5000")
    if os.geteuid() != 0:
        print("[bench.fastpath] needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    missing = [t for t in ("iperf3", "ethtool", "iptables", "ip", "ss") if shutil.which(t) is None]
    if missing:
        print(f"[bench.fastpath] needs {', '.join(missing)} (make deps)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="serval-bench-fastpath-") as work:
        with Lab() as lab:
            bench = FastPathBench(args, lab, Path(work))
            try:
                bench.run()
            except Exception as exc:      # noqa: BLE001 - the lab itself failed: report what was measured
                bench.steps.fail("the lab", exc)
        steps = bench.steps
    progress(f"done in {time.monotonic() - t0:.0f} s (lab torn down)")
    return finish("bench.fastpath", records(steps), steps, Path(args.json))


if __name__ == "__main__":
    sys.exit(main())
