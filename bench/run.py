"""Benchmark of the gateway pair, in one lab and one run: ``python -m bench.run``.

    client 198.19.1.2 --- cgw --- sgw --- server 198.19.3.2

Built with ``gateway_pair(lab, server_route_back=True)``, so the client can also reach
the server directly, through cgw and sgw acting as plain kernel routers. Each number
is measured in that same lab, one after the other:

``throughput_direct``
    One iperf3 TCP flow client -> server:8080, plain forwarding, no Python anywhere.
    What the kernel and the veths can do on this machine (Gbit/s, receiver side).
``throughput_nfqueue_accept_only_one``
    The same flow with the forwarded packets of that flow (both directions) queued on
    cgw to ``bench/accept_only.py``: a Python NFQUEUE consumer that only calls
    ``pkt.accept()``.
``throughput_nfqueue_accept_only``
    The same, with one accept-only consumer on cgw AND one on sgw. This is the fair
    baseline for the gateway pair: the pair also puts every packet of a flow through
    two Python NFQUEUE consumers (one per gateway), so this figure is the ceiling the
    pair could reach if its translation cost nothing. Its ratio to the direct figure
    is the price of NFQUEUE + Python themselves; the pair's ratio to it is the price
    of the translation (parsing, rewriting, checksums, flow state, re-injection).
``throughput_gateway_pair``
    The same iperf3 flow to the service's virtual address 198.18.0.10:80 through the
    started client and server gateways (the backend is iperf3 on server:8080). It is
    shown twice: against the accept-only baseline and against direct.
``connect_p50/p99_direct``, ``connect_p50/p99_gateway``
    1000 sequential connects from the client namespace (the duration of
    ``socket.create_connection``: SYN sent to connection established, then close),
    to a tiny Python server on server:8081 directly, or to 198.18.0.10:81 through
    the gateways (the SAL handshake happens before the client's SYN-ACK). In ms.
``connections_per_second_direct``, ``connections_per_second_gateway``
    A few concurrent workers each doing connect / send / read reply / close for a fixed
    time (default 4 workers, at most 5 s and at most 3000 connections); completed
    connections per second over the time used. ``connection_failures_*`` counts
    failures. The gateway phase starts once the gateways' flow tables have drained.
    The cap keeps the phase measuring how fast the pair sets flows up, not a limit a
    longer burst runs into first: the client's own kernel, whose connect() port search
    slows to a crawl once ~10k of its sockets sit in TIME_WAIT (the client closes
    first), direct or not. (Sustained rates over 60 s: ``bench.hardening``.)
``gateway_*``
    The gateways' own counters after the run (drops, internal errors, kernel queue
    drops); a gateway internal error or an unclean gateway exit fails the run.

Prints a table (metric, value, unit, baseline, ratio = value / baseline's value) and
writes the records to ``build/bench.json``. Timings are never asserted; a phase that
fails (iperf3 error, a consumer that saw no packets, gateways that do not start)
makes the run exit non-zero. The lab is always torn down.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.records import table
from lab.gateways import VIRTUAL_ADDR, GatewayError, RunningGateways
from lab.topologies import GatewayPair, gateway_pair
from lab.topology import Host, Lab

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
IPERF_PORT = 8080          # iperf3 server on the server; the gateway service port 80 maps to it
TINY_PORT = 8081           # tiny_server.py on the server; service port 81 maps to it
TINY_SERVICE_PORT = 81
GBIT = 1e9


class BenchError(RuntimeError):
    """A phase failed: the run exits non-zero."""


def progress(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def wait_line(proc: subprocess.Popen, expect: str, timeout: float, what: str) -> None:
    """Wait until ``proc`` prints a line equal to ``expect``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited {proc.returncode}: {proc.stdout.read()[-2000:]}")
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready and proc.stdout.readline().strip() == expect:
            return
    raise BenchError(f"{what} did not print {expect!r} within {timeout:.0f} s")


def wait_port(host: Host, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host.run(["ss", "-ltnH", f"sport = :{port}"], check=False).stdout.strip():
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on {host.name}:{port}")


def iperf3_end(client: Host, addr: str, port: int, seconds: int, streams: int = 1,
               reverse: bool = False) -> dict:
    """An iperf3 TCP test from ``client``: its JSON ``end`` section (BenchError if it
    failed or moved nothing)."""
    argv = ["iperf3", "-c", addr, "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout", "5000"]
    if streams > 1:
        argv += ["-P", str(streams)]
    if reverse:
        argv.append("-R")
    r = client.run(argv, check=False, timeout=seconds + 40)
    try:
        result = json.loads(r.stdout)
    except ValueError:
        raise BenchError(f"iperf3 to {addr}:{port}: exit {r.returncode}: {r.stdout[-500:]} {r.stderr[-500:]}")
    if r.returncode or "error" in result:
        raise BenchError(f"iperf3 to {addr}:{port}: exit {r.returncode}: {result.get('error')}")
    if result["end"]["sum_received"]["bytes"] <= 0:
        raise BenchError(f"iperf3 to {addr}:{port} moved no data")
    return result["end"]


def iperf(pair: GatewayPair, addr: str, port: int, seconds: int) -> dict:
    """One iperf3 TCP flow from the client; receiver-side Gbit/s and sender retransmits."""
    end = iperf3_end(pair.client, addr, port, seconds)
    return {"gbps": end["sum_received"]["bits_per_second"] / GBIT,
            "retransmits": end["sum_sent"].get("retransmits")}


def probe(pair: GatewayPair, *args, timeout: float) -> dict:
    r = pair.client.run([sys.executable, str(BENCH / "probe.py"), *map(str, args)],
                        check=False, timeout=timeout)
    if r.returncode:
        raise BenchError(f"probe {' '.join(map(str, args))}: exit {r.returncode}: {r.stderr[-1500:]}")
    return json.loads(r.stdout)


def latency(pair: GatewayPair, addr: str, port: int, count: int) -> dict:
    result = probe(pair, "latency", addr, port, "--count", count, "--max-seconds", 60, timeout=90)
    if result["n"] == 0:
        raise BenchError(f"no connection to {addr}:{port} succeeded: {result['errors']}")
    return result


def rate(pair: GatewayPair, addr: str, port: int, seconds: float, workers: int, max_total: int) -> dict:
    result = probe(pair, "rate", addr, port, "--seconds", seconds, "--workers", workers,
                   "--max-total", max_total, timeout=seconds + 60)
    if result["ok"] == 0:
        raise BenchError(f"no connection to {addr}:{port} completed: {result['errors']}")
    return result


def drain(gws: RunningGateways, timeout: float = 20.0) -> None:
    """Wait (bounded) until both gateways hold no flow: a closed flow keeps its server-side
    port for the linger time (10 s), and the connections/s phase should start from an
    empty port pool rather than inherit the latency phase's 1000 lingering flows."""
    progress("waiting for the gateways' flow tables to drain (closed flows linger 10 s)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gws.stats(role).get("flows_live", 0) == 0 for role in ("client", "server")):
            return
        time.sleep(0.5)
    progress("flow tables did not drain in time; measuring anyway")


class AcceptOnly:
    """accept_only.py consumers on some of the gateway hosts, and the raw-table rules that
    queue the iperf3 flow's packets (both directions) to them; all undone on exit."""

    def __init__(self, pair: GatewayPair, hosts_queues: list[tuple[Host, int]]):
        self.pair = pair
        self.hosts_queues = hosts_queues
        self.procs: list[tuple[Host, subprocess.Popen]] = []
        self.rules: list[tuple[Host, list[str]]] = []
        self.counts: dict[str, int] = {}

    def _matches(self) -> list[list[str]]:
        c, s = self.pair.client_addr, self.pair.server_addr
        return [["-p", "tcp", "-s", c, "-d", s, "--dport", str(IPERF_PORT)],
                ["-p", "tcp", "-s", s, "--sport", str(IPERF_PORT), "-d", c]]

    def __enter__(self) -> "AcceptOnly":
        try:
            for host, queue in self.hosts_queues:
                proc = host.popen([sys.executable, str(BENCH / "accept_only.py"), str(queue)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                self.procs.append((host, proc))
                wait_line(proc, "ready", 10, f"accept-only consumer on {host.name}")
                for match in self._matches():
                    rule = [*match, "-j", "NFQUEUE", "--queue-num", str(queue)]
                    host.run(["iptables", "-t", "raw", "-I", "PREROUTING", *rule])
                    self.rules.append((host, rule))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        errors = []
        for host, rule in reversed(self.rules):
            r = host.run(["iptables", "-t", "raw", "-D", "PREROUTING", *rule], check=False)
            if r.returncode:
                errors.append(f"removing {rule} on {host.name}: {r.stderr.strip()}")
        self.rules.clear()
        for host, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            for line in out.splitlines():
                if line.startswith("{"):
                    self.counts[host.name] = json.loads(line)["packets"]
        self.procs.clear()
        if errors:
            raise BenchError("; ".join(errors))

    def check(self, minimum: int = 1000) -> None:
        for host, _ in self.hosts_queues:
            n = self.counts.get(host.name, 0)
            if n < minimum:
                raise BenchError(f"accept-only consumer on {host.name} saw only {n} packets: "
                                 "the flow did not go through it")


class Results:
    def __init__(self):
        self.records: list[dict] = []
        self.values: dict[str, float] = {}

    def add(self, metric: str, value, unit: str, baseline: str | None = None) -> None:
        ratio = None
        if baseline is not None and value is not None and self.values.get(baseline):
            ratio = value / self.values[baseline]
        self.records.append({"metric": metric, "value": value, "unit": unit,
                             "baseline": baseline, "ratio": ratio})
        self.values.setdefault(metric, value)

    def table(self) -> str:
        return table(self.records)


def start_servers(pair: GatewayPair) -> None:
    """iperf3 and the tiny connect server on the server host, both listening."""
    pair.server.popen(["iperf3", "-s", "-p", str(IPERF_PORT)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tiny = pair.server.popen([sys.executable, str(BENCH / "tiny_server.py"), str(TINY_PORT)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_line(tiny, "ready", 10, "tiny server")
    wait_port(pair.server, IPERF_PORT)


def run(args) -> Results:
    res = Results()
    t_start = time.monotonic()
    with Lab() as lab:
        progress(f"building the lab ({lab.prefix}-*): client --- cgw --- sgw --- server")
        pair = gateway_pair(lab, server_route_back=True)
        start_servers(pair)
        direct = pair.server_addr

        # --- direct: plain forwarding through cgw and sgw -----------------------------
        progress(f"measuring throughput_direct: iperf3 -t {args.seconds} to {direct}:{IPERF_PORT}")
        res.add("throughput_direct", iperf(pair, direct, IPERF_PORT, args.seconds)["gbps"], "Gbit/s")

        progress(f"measuring connect latency direct: {args.connects} connects to {direct}:{TINY_PORT}")
        lat_direct = latency(pair, direct, TINY_PORT, args.connects)

        progress(f"measuring connections/s direct: {args.workers} workers for {args.cps_seconds} s "
                 f"or {args.cps_max} connections")
        cps_direct = rate(pair, direct, TINY_PORT, args.cps_seconds, args.workers, args.cps_max)

        # --- NFQUEUE accept-only consumers on the forwarding path ------------------------
        if not args.skip_one:
            progress("measuring throughput_nfqueue_accept_only_one: accept-only consumer on cgw")
            with AcceptOnly(pair, [(pair.cgw, 0)]) as ao:
                one = iperf(pair, direct, IPERF_PORT, args.seconds)
            ao.check()
            res.add("throughput_nfqueue_accept_only_one", one["gbps"], "Gbit/s", "throughput_direct")

        progress("measuring throughput_nfqueue_accept_only: accept-only consumers on cgw and sgw")
        with AcceptOnly(pair, [(pair.cgw, 0), (pair.sgw, 1)]) as ao:
            both = iperf(pair, direct, IPERF_PORT, args.seconds)
        ao.check()
        res.add("throughput_nfqueue_accept_only", both["gbps"], "Gbit/s", "throughput_direct")

        # --- through the gateway pair ---------------------------------------------------
        progress("starting the gateway pair (carriage ip)")
        gws = RunningGateways(pair, carriage="ip", extra_services=[
            ("echo.svc.example", TINY_SERVICE_PORT, VIRTUAL_ADDR, TINY_PORT)])
        try:
            gws.start()
            try:
                progress(f"measuring throughput_gateway_pair: iperf3 -t {args.seconds} to {VIRTUAL_ADDR}:80")
                gw = iperf(pair, VIRTUAL_ADDR, 80, args.seconds)
                res.add("throughput_gateway_pair", gw["gbps"], "Gbit/s", "throughput_nfqueue_accept_only")
                res.add("throughput_gateway_pair", gw["gbps"], "Gbit/s", "throughput_direct")
                res.add("retransmits_gateway_pair", gw["retransmits"], "segments")

                progress(f"measuring connect latency through the gateways: {args.connects} connects "
                         f"to {VIRTUAL_ADDR}:{TINY_SERVICE_PORT}")
                lat_gw = latency(pair, VIRTUAL_ADDR, TINY_SERVICE_PORT, args.connects)

                drain(gws)
                progress(f"measuring connections/s through the gateways: {args.workers} workers "
                         f"for {args.cps_seconds} s or {args.cps_max} connections")
                cps_gw = rate(pair, VIRTUAL_ADDR, TINY_SERVICE_PORT, args.cps_seconds, args.workers,
                              args.cps_max)
                time.sleep(0.5)   # let the last closes finish before reading counters
                stats = {role: gws.stats(role) for role in ("client", "server")}
            except BaseException:
                progress("client gateway log:\n" + gws.log("client"))
                progress("server gateway log:\n" + gws.log("server"))
                raise
        finally:
            codes = gws.stop()

        res.add("connect_p50_direct", lat_direct["p50_ms"], "ms")
        res.add("connect_p99_direct", lat_direct["p99_ms"], "ms")
        res.add("connect_p50_gateway", lat_gw["p50_ms"], "ms", "connect_p50_direct")
        res.add("connect_p99_gateway", lat_gw["p99_ms"], "ms", "connect_p99_direct")
        res.add("connect_failures_direct", lat_direct["failures"], "connections")
        res.add("connect_failures_gateway", lat_gw["failures"], "connections")
        res.add("connections_per_second_direct", cps_direct["per_second"], "conn/s")
        res.add("connections_per_second_gateway", cps_gw["per_second"], "conn/s",
                "connections_per_second_direct")
        res.add("connection_failures_direct", cps_direct["failed"], "connections")
        res.add("connection_failures_gateway", cps_gw["failed"], "connections")
        for role, s in stats.items():
            dropped = sum(v for k, v in s.items() if k.startswith("dropped_"))
            res.add(f"gateway_{role}_dropped", dropped, "packets")
            res.add(f"gateway_{role}_internal_errors", s.get("internal_errors", 0), "packets")
            res.add(f"gateway_{role}_kernel_queue_dropped",
                    s.get("kernel_queue_dropped", 0) + s.get("kernel_user_dropped", 0), "packets")
        for name, r in (("direct", lat_direct), ("gateway", lat_gw), ("cps direct", cps_direct),
                        ("cps gateway", cps_gw)):
            if r.get("errors"):
                progress(f"{name} connection errors: {r['errors']}")
        for role, s in stats.items():
            details = {k: v for k, v in s.items() if k.startswith("dropped_") and v}
            if details:
                progress(f"{role} gateway drops: {details}")
        errors = [f"{role} gateway: internal_errors={s['internal_errors']}"
                  for role, s in stats.items() if s.get("internal_errors")]
        errors += [f"{role} gateway exited {code}" for role, code in codes.items() if code != 0]
        if errors:
            raise BenchError("; ".join(errors) + "\n" + gws.log("client") + "\n" + gws.log("server"))
    progress(f"done in {time.monotonic() - t_start:.0f} s")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark the gateway pair in lab namespaces.")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 duration per throughput phase")
    ap.add_argument("--connects", type=int, default=1000, help="sequential connects per latency phase")
    ap.add_argument("--cps-seconds", type=float, default=5.0, help="duration of each connections/s phase")
    ap.add_argument("--workers", type=int, default=4, help="concurrent workers in the connections/s phase")
    ap.add_argument("--cps-max", type=int, default=3000,
                    help="stop a connections/s phase after this many connections (below the server "
                         "gateway's 4000-port pool, so the phase measures processing, not the pool)")
    ap.add_argument("--skip-one", action="store_true", help="skip the single accept-only consumer phase")
    ap.add_argument("--out", default=str(REPO / "build" / "bench.json"))
    args = ap.parse_args(argv)
    if not (1 <= args.seconds <= 30 and 1 <= args.connects <= 5000 and 0.5 <= args.cps_seconds <= 30
            and 1 <= args.workers <= 32 and 1 <= args.cps_max <= 100_000):
        ap.error("keep the phases small: seconds 1..30, connects 1..5000, cps-seconds 0.5..30, "
                 "workers 1..32, cps-max 1..100000")
    if os.geteuid() != 0:
        print("[bench] needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    for tool in ("iperf3", "iptables", "ip", "ss"):
        if shutil.which(tool) is None:
            print(f"[bench] {tool} is not installed", file=sys.stderr)
            return 2
    try:
        res = run(args)
    except (BenchError, GatewayError, subprocess.SubprocessError, OSError) as exc:
        print(f"[bench] FAILED: {exc}", file=sys.stderr)
        return 1
    print()
    print(res.table())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res.records, indent=2) + "\n")
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
