"""UDP services through the gateway pair beside the direct path, in one lab and one run:
``python -m bench.udp``.

    client 198.19.1.2 --- cgw --- sgw --- server 198.19.3.2

Built with ``gateway_pair(lab, server_route_back=True, wire=True)``: the client can
reach the server directly, through cgw and sgw acting as plain kernel routers, or
through the started gateways by the virtual address 198.18.0.10. The servers, all on
the server, started once: iperf3 (TCP control and UDP data on 5201) and dnsmasq
(authoritative for ``bench.example``, on 5300). Each figure is measured directly first,
then through the gateways (IP carriage) with the kernel fast path on (established UDP
flows translated by the tc program), then with ``fast_path = "off"`` (every datagram
through Python; ``--fast-path`` picks one or both). Every ratio is against the direct
figure of this same run; nothing is asserted.

``udp_throughput_direct``, ``udp_throughput_gateway_pair``, ``udp_throughput_gateway_pair_python``
    The highest ``iperf3 -u`` rate (1400-byte datagrams, ``--udp-seconds`` per trial)
    that loses less than 1 %, found by a short search: the offered rate doubles from
    ``--start-mbit`` until a trial loses 1 % or more (or ``--max-mbit``), then
    ``--bisect`` halvings between the last good and the first bad rate. The figure is
    the receiver's Mbit/s at the best good rate. ``udp_throughput_ratio`` is
    gateway pair (fast path) / direct, ``udp_throughput_ratio_python`` the same with
    the fast path off.
``dns_qps_direct``, ``dns_qps_through_gateways``, ``dns_qps_through_gateways_python``
    ``dnsperf`` (Debian's, one socket, ``--outstanding`` queries in flight, 100 names)
    against dnsmasq for ``--dns-seconds``: queries per second completed.
    ``dns_qps_through_gateways_ratio`` is through (fast path) / direct,
    ``dns_qps_through_gateways_ratio_python`` the same with it off; ``dns_lost_*``
    counts the queries dnsperf gave up on.
``udp_flow_setup_ms_p50_direct``, ``udp_flow_setup_ms_p50``, ``udp_flow_setup_ms_p99``
    ``--flows`` fresh connected UDP sockets, one after the other, each sending one DNS
    query and timing until its answer (through the gateways each is a new SAL flow:
    SYN, SYN-ACK, the held datagram, the answer). In ms; ``udp_flow_setup_lost`` counts
    queries not answered within a second.
``udp_gateway_*``
    The gateways' counters after the fast-path run: UDP flows opened, drops, and the
    packets the kernel translated (``udp_gateway_*_fastpath_translated``) beside those
    Python did (``udp_gateway_*_python_translated``).

A step that fails is reported (its records FAILED, ``udp_bench_failed_steps`` names it)
and the others still run; the run then exits 1. The lab is always torn down.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import BenchError
from bench.steps import Steps, finish

REPO = Path(__file__).resolve().parent.parent
IPERF_PORT = 5201
DNS_PORT, DNS_SERVICE_PORT = 5300, 53
DATAGRAM = 1400                  # iperf3 -l: fits the path with the SAL header on both carriages
NAMES = 100
ANSWER = "198.19.9.9"
T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[bench.udp {time.monotonic() - T0:5.0f} s] {msg}", flush=True)


# --- the flow-setup probe, run inside the client namespace -----------------------------------

def dns_query(txid: int, name: str) -> bytes:
    """A minimal DNS query (A, IN, recursion desired)."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def setup_probe(addr: str, port: int, count: int, timeout: float = 1.0) -> dict:
    """``count`` fresh connected UDP sockets, each timed from its first datagram to its
    answer (matched on the query id)."""
    times, lost = [], 0
    for i in range(count):
        txid = i & 0xFFFF
        query = dns_query(txid, f"f{i}.bench.example")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, port))
            s.settimeout(timeout)
            t0 = time.perf_counter()
            s.send(query)
            try:
                while True:
                    reply = s.recv(2048)
                    if reply[:2] == query[:2]:
                        times.append((time.perf_counter() - t0) * 1000)
                        break
            except OSError:
                lost += 1
    return {"times_ms": times, "lost": lost}


# --- measurements, all from the client namespace ---------------------------------------------

def percentile(values: list, p: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))
    return values[k]


def iperf_udp(client, addr: str, mbit: float, seconds: int) -> tuple[float, float]:
    """One ``iperf3 -u`` trial at ``mbit``: (lost percent, receiver Mbit/s)."""
    argv = ["iperf3", "-c", addr, "-p", str(IPERF_PORT), "-u", "-b", f"{mbit:.0f}M", "-l", str(DATAGRAM),
            "-t", str(seconds), "-J", "--connect-timeout", "5000"]
    r = client.run(argv, check=False, timeout=seconds + 30)
    try:
        result = json.loads(r.stdout)
    except ValueError:
        raise BenchError(f"iperf3 -u to {addr}: exit {r.returncode}: {r.stdout[-300:]} {r.stderr[-300:]}")
    if r.returncode or "error" in result:
        raise BenchError(f"iperf3 -u to {addr}: exit {r.returncode}: {result.get('error')}")
    end = result["end"]
    total = end.get("sum_received") or end["sum"]       # the receiver's view (iperf3 >= 3.10 has it)
    if not total.get("packets"):
        raise BenchError(f"iperf3 -u to {addr}: nothing received")
    return total["lost_percent"], total["bits_per_second"] / 1e6


def highest_rate(client, addr: str, args) -> float:
    """Receiver Mbit/s at the highest offered rate losing < 1 % (doubling, then bisecting)."""
    good_rate, good_mbit, bad = None, None, None
    rate = args.start_mbit
    while rate <= args.max_mbit:
        lost, mbit = iperf_udp(client, addr, rate, args.udp_seconds)
        progress(f"  {addr}: offered {rate:.0f} Mbit/s, lost {lost:.2f} %, received {mbit:.0f} Mbit/s")
        if lost >= 1.0:
            bad = rate
            break
        good_rate, good_mbit = rate, mbit
        rate *= 2
    if good_rate is None:
        raise BenchError(f"{addr}: even {args.start_mbit} Mbit/s lost 1 % or more")
    for _ in range(args.bisect if bad else 0):
        rate = (good_rate + bad) / 2
        lost, mbit = iperf_udp(client, addr, rate, args.udp_seconds)
        progress(f"  {addr}: offered {rate:.0f} Mbit/s, lost {lost:.2f} %, received {mbit:.0f} Mbit/s")
        if lost < 1.0:
            good_rate, good_mbit = rate, mbit
        else:
            bad = rate
    return good_mbit


def dnsperf_qps(client, addr: str, port: int, queries: Path, seconds: float, outstanding: int) -> tuple[float, int]:
    argv = ["dnsperf", "-s", addr, "-p", str(port), "-d", str(queries), "-l", f"{seconds:g}",
            "-q", str(outstanding), "-t", "2", "-c", "1", "-T", "1"]
    r = client.run(argv, check=False, timeout=seconds + 30)
    from bench.dns import parse_dnsperf
    stats = parse_dnsperf(r.stdout)
    if r.returncode or "qps" not in stats or not stats.get("completed"):
        raise BenchError(f"dnsperf to {addr}:{port}: exit {r.returncode}: {r.stderr[-300:]} {r.stdout[-300:]}")
    bad = {k: v for k, v in stats["rcodes"].items() if k != "NOERROR"}
    if bad:
        raise BenchError(f"dnsperf to {addr}:{port}: rcodes {bad}")
    return stats["qps"], stats["lost"]


def flow_setup(client, addr: str, port: int, count: int) -> dict:
    r = client.run([sys.executable, "-m", "bench.udp", "setup-probe", addr, str(port), str(count)],
                   check=False, timeout=count * 1.5 + 30, cwd=str(REPO))
    if r.returncode:
        raise BenchError(f"setup probe to {addr}:{port}: exit {r.returncode}: {r.stderr[-800:]}")
    result = json.loads(r.stdout)
    if len(result["times_ms"]) < count // 2:
        raise BenchError(f"setup probe to {addr}:{port}: {result['lost']} of {count} queries unanswered")
    return result


# --- the lab ---------------------------------------------------------------------------------

def udp_services(pair, virtual: str) -> tuple[str, str]:
    """The UDP services (and iperf3's TCP control connection), appended to both configs."""
    client = f'''
[[service]]
name = "iperf.svc.example"
address = "{virtual}"
port = {IPERF_PORT}

[[service]]
name = "iperf.svc.example"
address = "{virtual}"
port = {IPERF_PORT}
protocol = "udp"

[[service]]
name = "dns.svc.example"
address = "{virtual}"
port = {DNS_SERVICE_PORT}
protocol = "udp"

[[route]]
service = "iperf.svc.example"
next_hop = "{pair.sgw_sal}"

[[route]]
service = "dns.svc.example"
next_hop = "{pair.sgw_sal}"
'''
    server = f'''
[[service]]
name = "iperf.svc.example"
port = {IPERF_PORT}
backend = "{pair.server_addr}:{IPERF_PORT}"

[[service]]
name = "iperf.svc.example"
port = {IPERF_PORT}
protocol = "udp"
backend = "{pair.server_addr}:{IPERF_PORT}"

[[service]]
name = "dns.svc.example"
port = {DNS_SERVICE_PORT}
protocol = "udp"
backend = "{pair.server_addr}:{DNS_PORT}"
'''
    return client, server


def start_servers(pair) -> None:
    pair.server.popen(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", f"--port={DNS_PORT}",
                       f"--listen-address={pair.server_addr}", "--bind-interfaces", "--no-resolv", "--no-hosts",
                       "--pid-file=", "--user=root", f"--address=/bench.example/{ANSWER}", "--cache-size=0"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    iperf = pair.server.popen(["iperf3", "-s", "-p", str(IPERF_PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        dns = pair.server.run(["dig", f"@{pair.server_addr}", "-p", str(DNS_PORT), "+short", "+tries=1", "+time=1",
                               "up.bench.example"], check=False).stdout.split()
        tcp = pair.server.run(["ss", "-Htln", f"sport = :{IPERF_PORT}"], check=False).stdout.strip()
        if dns == [ANSWER] and tcp:
            return
        if iperf.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"servers did not start (dnsmasq answered {dns}, iperf3 listening: {bool(tcp)})")
        time.sleep(0.1)


def measure(steps: Steps, client, label: str, addr: str, dns_port: int, args, queries: Path,
            setup: bool = True) -> None:
    steps.step(f"{label}: iperf3 -u, highest rate under 1 % loss",
               lambda: {f"udp_throughput_{label}": highest_rate(client, addr, args)})

    def dns():
        dnsperf_qps(client, addr, dns_port, queries, 1, 8)            # warm-up
        qps, lost = dnsperf_qps(client, addr, dns_port, queries, args.dns_seconds, args.outstanding)
        return {f"dns_qps_{label}": qps, f"dns_lost_{label}": lost}
    steps.step(f"{label}: dnsperf, {args.outstanding} outstanding, {args.dns_seconds:g} s", dns)

    def flow_setup_step():
        result = flow_setup(client, addr, dns_port, args.flows)
        return {f"udp_flow_setup_ms_p50_{label}": percentile(result["times_ms"], 50),
                f"udp_flow_setup_ms_p99_{label}": percentile(result["times_ms"], 99),
                f"udp_flow_setup_lost_{label}": result["lost"]}
    if setup:
        steps.step(f"{label}: {args.flows} fresh UDP flows, first datagram to answer", flow_setup_step)


def run(args, work: Path, steps: Steps) -> None:
    from lab.gateways import VIRTUAL_ADDR, RunningGateways
    from lab.topologies import gateway_pair
    from lab.topology import Lab

    queries = work / "queries.txt"
    queries.write_text("".join(f"n{i}.bench.example A\n" for i in range(NAMES)))
    with Lab() as lab:
        progress(f"building the lab {lab.prefix}-*: client --- cgw --- sgw --- server")
        pair = gateway_pair(lab, server_route_back=True, wire=True)
        if not steps.step("servers: iperf3 -s, dnsmasq", lambda: start_servers(pair) or {}):
            return
        measure(steps, pair.client, "direct", pair.server_addr, DNS_PORT, args, queries)
        for fast_path in (["on", "off"] if args.fast_path == "both" else [args.fast_path]):
            through_gateways(steps, pair, fast_path, args, queries, VIRTUAL_ADDR, RunningGateways)


def through_gateways(steps: Steps, pair, fast_path: str, args, queries: Path, virtual: str, gateways) -> None:
    """The gateway pair started with ``fast_path`` ("on": the kernel translates the
    established flows), measured, stopped."""
    label = "gateway_pair" if fast_path == "on" else "gateway_pair_python"
    gws = gateways(pair, carriage="ip", fast_path=fast_path)
    client_extra, server_extra = udp_services(pair, virtual)
    for role, extra in (("client", client_extra), ("server", server_extra)):
        gws.configs[role].write_text(gws.configs[role].read_text() + extra)
    try:
        if steps.step(f"starting the gateway pair (carriage ip, fast path {fast_path})", lambda: gws.start() and {}):
            measure(steps, pair.client, label, virtual, DNS_SERVICE_PORT, args, queries,
                    setup=fast_path == "on")

            def counters():
                out = {}
                for role in ("client", "server"):
                    s = gws.stats(role)
                    if s.get("internal_errors"):
                        raise BenchError(f"{role} gateway: internal_errors={s['internal_errors']}")
                    if fast_path != "on":
                        continue
                    if s.get("fastpath") != "on":
                        raise BenchError(f"{role} gateway: the fast path did not start (fast_path = \"on\")")
                    out[f"udp_gateway_{role}_flows_opened"] = s.get("udp_flows_opened", 0)
                    out[f"udp_gateway_{role}_dropped"] = sum(v for k, v in s.items()
                                                             if k.startswith("dropped_") and isinstance(v, int))
                    out[f"udp_gateway_{role}_fastpath_translated"] = \
                        s.get("fastpath_to_sal", 0) + s.get("fastpath_from_sal", 0)
                    out[f"udp_gateway_{role}_python_translated"] = s.get("to_sal", 0) + s.get("from_sal", 0)
                return out
            steps.step(f"gateway counters (fast path {fast_path})", counters)
    finally:
        codes = gws.stop()
        if any(codes.values()):
            steps.failures.append((f"gateway pair stop (fast path {fast_path})", f"gateways exited {codes}"))
            for role, code in codes.items():
                if code:
                    progress(f"{role} gateway exited {code}; its log:\n{gws.log(role)}")
        shutil.rmtree(gws.dir, ignore_errors=True)


def records(steps: Steps) -> list[dict]:
    values = steps.values
    out: list[dict] = []

    def add(metric: str, unit: str, baseline: str | None = None, value=None, of: str | None = None) -> None:
        """``of``: a ratio record, ``value`` = values[of] / values[baseline]."""
        if of is not None:
            top, bottom = values.get(of), values.get(baseline)
            value = top / bottom if top is not None and bottom else None
            baseline = None
        elif value is None:
            value = values.get(metric)
        ratio = None
        if baseline is not None and value is not None and values.get(baseline):
            ratio = value / values[baseline]
        rec = {"metric": metric, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio}
        if value is None:
            rec["error"] = "not measured: a step failed"
        out.append(rec)

    add("udp_throughput_direct", "Mbit/s")
    add("udp_throughput_gateway_pair", "Mbit/s", "udp_throughput_direct")
    add("udp_throughput_ratio", "gateway/direct", "udp_throughput_direct", of="udp_throughput_gateway_pair")
    add("udp_throughput_gateway_pair_python", "Mbit/s", "udp_throughput_direct")
    add("udp_throughput_ratio_python", "gateway/direct", "udp_throughput_direct",
        of="udp_throughput_gateway_pair_python")
    add("dns_qps_direct", "queries/s")
    add("dns_qps_through_gateways", "queries/s", "dns_qps_direct", value=values.get("dns_qps_gateway_pair"))
    add("dns_qps_through_gateways_ratio", "gateway/direct", "dns_qps_direct", of="dns_qps_gateway_pair")
    add("dns_qps_through_gateways_python", "queries/s", "dns_qps_direct", value=values.get("dns_qps_gateway_pair_python"))
    add("dns_qps_through_gateways_ratio_python", "gateway/direct", "dns_qps_direct",
        of="dns_qps_gateway_pair_python")
    add("dns_lost_direct", "queries")
    add("dns_lost_through_gateways", "queries", value=values.get("dns_lost_gateway_pair"))
    add("udp_flow_setup_ms_p50_direct", "ms")
    add("udp_flow_setup_ms_p50", "ms", "udp_flow_setup_ms_p50_direct",
        value=values.get("udp_flow_setup_ms_p50_gateway_pair"))
    add("udp_flow_setup_ms_p99_direct", "ms")
    add("udp_flow_setup_ms_p99", "ms", "udp_flow_setup_ms_p99_direct",
        value=values.get("udp_flow_setup_ms_p99_gateway_pair"))
    add("udp_flow_setup_lost", "flows", value=values.get("udp_flow_setup_lost_gateway_pair"))
    for role in ("client", "server"):
        add(f"udp_gateway_{role}_flows_opened", "flows")
        add(f"udp_gateway_{role}_dropped", "packets")
        add(f"udp_gateway_{role}_fastpath_translated", "packets")
        add(f"udp_gateway_{role}_python_translated", "packets")
    out.append({"metric": "udp_bench_failed_steps", "value": len(steps.failures), "unit": "steps",
                "baseline": None, "ratio": None,
                "failures": [f"{name}: {why}" for name, why in steps.failures]})
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["setup-probe"]:               # run by flow_setup() inside the client namespace
        addr, port, count = argv[1], int(argv[2]), int(argv[3])
        print(json.dumps(setup_probe(addr, port, count)))
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench.udp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--udp-seconds", type=int, default=2, help="iperf3 -u seconds per trial (default 2)")
    ap.add_argument("--start-mbit", type=float, default=50, help="first offered rate of the search (default 50)")
    ap.add_argument("--max-mbit", type=float, default=3200, help="highest offered rate tried (default 3200)")
    ap.add_argument("--bisect", type=int, default=2, help="halvings after the first lossy rate (default 2)")
    ap.add_argument("--dns-seconds", type=float, default=5, help="dnsperf seconds per path (default 5)")
    ap.add_argument("--outstanding", type=int, default=64, help="dnsperf queries in flight (default 64)")
    ap.add_argument("--flows", type=int, default=300, help="fresh UDP flows timed per path (default 300)")
    ap.add_argument("--fast-path", choices=("both", "on", "off"), default="both",
                    help="the gateway pair with the kernel fast path on, off, or both in turn (default both)")
    ap.add_argument("--json", default=None, help="records file to merge into (default build/bench.json)")
    args = ap.parse_args(argv)
    if not (1 <= args.udp_seconds <= 10 and 1 <= args.dns_seconds <= 30 and 10 <= args.flows <= 2000):
        ap.error("keep the steps small: udp-seconds 1..10, dns-seconds 1..30, flows 10..2000")
    if os.geteuid() != 0:
        print("[bench.udp] needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    missing = [t for t in ("iperf3", "dnsperf", "dnsmasq", "dig", "ip", "ss") if shutil.which(t) is None]
    if missing:
        print(f"[bench.udp] needs {', '.join(missing)} (make deps)", file=sys.stderr)
        return 2
    from bench.records import BENCH_JSON
    steps = Steps(progress)
    with tempfile.TemporaryDirectory(prefix="serval-bench-udp-") as work:
        try:
            run(args, Path(work), steps)
        except Exception as exc:          # noqa: BLE001 - the lab itself failed: report what was measured
            steps.fail("the lab", exc)
    progress("done (lab torn down)")
    return finish("bench.udp", records(steps), steps, Path(args.json) if args.json else BENCH_JSON)


if __name__ == "__main__":
    sys.exit(main())
