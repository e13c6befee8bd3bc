"""DNS benchmark: ``serval dns`` beside Debian's dnsmasq, one lab, one run:
``python -m bench.dns``.

    load 198.19.60.2 ---- 198.19.60.1  dns   serval dns
                          198.19.60.10       dnsmasq, caching forwarder
                          198.19.60.11       dnsmasq "origin": bench.test records, TTL 3600

Both servers run in the same namespace on the same machine, both forward to the same
origin, and both are driven by the same load generator (``dnsperf``, Debian) with the
same query files, one after the other, for the same time:

``dns_qps_service``
    Queries per second ``serval dns`` answers for service names (A for
    ``s0..s99.svc.example``: virtual addresses, already allocated by a warm-up pass).
``dns_qps_cached_forward``
    The same for forwarded names served from its cache (A for ``n0..n99.bench.test``,
    warmed up: every query is a cache hit).
``dns_qps_dnsmasq_cached``
    dnsmasq, as a caching forwarder in front of the same origin, for the same
    forwarded names (warmed up too): the baseline for both figures above.
``dns_p99_service``, ``dns_p99_cached_forward``, ``dns_p99_dnsmasq_cached``
    99th percentile latency (ms) at a fixed offered load (``--rate``, default 2000
    queries/s, ``dnsperf -Q``), every response timed (``dnsperf -v``); a lost query
    counts as the timeout.

Throughput phases keep ``--outstanding`` queries in flight for ``--duration`` seconds
(default 64 and 10 s); latency phases run ``--latency-duration`` seconds (5 s). Each phase is
cut into ``--rounds`` slices (5) run in turn with the other servers' slices, so a burst of
load from elsewhere on a shared machine hits every server alike. The rate
limiter of serval dns is off (one client sends everything). Prints a table and merges the
records ``{"metric","value","unit","baseline","ratio"}`` into ``build/bench.json``
(records of the same metric names are replaced, others kept). A phase that loses more
than 1 % of its queries, or gets an rcode other than NOERROR, fails the run (exit 1).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from bench.records import merge

REPO = Path(__file__).resolve().parent.parent
LOAD, SERVAL, DNSMASQ, ORIGIN = "198.19.60.2", "198.19.60.1", "198.19.60.10", "198.19.60.11"
NAMES = 100


class BenchError(RuntimeError):
    pass


def progress(msg: str) -> None:
    print(f"[bench.dns] {msg}", file=sys.stderr, flush=True)


def dnsperf(load, server: str, queries: Path, duration: float, outstanding: int = 64, rate: int | None = None,
            verbose_to: Path | None = None, timeout: float = 2.0) -> dict:
    argv = ["dnsperf", "-s", server, "-d", str(queries), "-l", f"{duration:g}", "-q", str(outstanding),
            "-t", f"{timeout:g}", "-c", "1", "-T", "1"]
    if rate:
        argv += ["-Q", str(rate)]
    if verbose_to:
        argv += ["-v"]
    out = open(verbose_to, "w") if verbose_to else None
    try:
        extra = {"capture_output": False, "stdout": out, "stderr": subprocess.PIPE} if out else {}
        r = load.run(argv, check=False, timeout=duration + 30, **extra)
    finally:
        if out:
            out.close()
    text = Path(verbose_to).read_text() if verbose_to else r.stdout
    stats = parse_dnsperf(text)
    if r.returncode or "qps" not in stats:
        raise BenchError(f"dnsperf failed ({r.returncode}): {r.stderr[-500:]} {text[-500:]}")
    if verbose_to:
        stats["latencies"] = [float(m.group(2)) if m.group(1) != "T" else timeout
                              for m in re.finditer(r"^> (\S+) \S+ \S+ ([\d.]+)$", text, re.M)]
        stats["latencies"] += [timeout] * stats["lost"]
    return stats


def parse_dnsperf(text: str) -> dict:
    out = {}
    for key, pattern in (("sent", r"Queries sent:\s+(\d+)"), ("completed", r"Queries completed:\s+(\d+)"),
                         ("lost", r"Queries lost:\s+(\d+)"), ("qps", r"Queries per second:\s+([\d.]+)"),
                         ("avg_latency", r"Average Latency \(s\):\s+([\d.]+)")):
        m = re.search(pattern, text)
        if m:
            out[key] = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    m = re.search(r"Response codes:\s+(.*)", text)
    out["rcodes"] = dict((code, int(n)) for code, n in re.findall(r"(\w+) (\d+) \(", m.group(1))) if m else {}
    return out


def check(stats: dict, what: str) -> None:
    if stats["sent"] == 0 or stats["lost"] > 0.01 * stats["sent"]:
        raise BenchError(f"{what}: {stats['lost']} of {stats['sent']} queries lost")
    bad = {k: v for k, v in stats["rcodes"].items() if k != "NOERROR"}
    if bad:
        raise BenchError(f"{what}: unexpected rcodes {bad}")


def percentile(values: list, p: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))
    return values[k]


def record(metric, value, unit, baseline=None, values=None) -> dict:
    base = (values or {}).get(baseline)
    return {"metric": metric, "value": value, "unit": unit, "baseline": baseline,
            "ratio": (value / base) if baseline and base else None}


def print_table(records: list) -> None:
    print(f"{'metric':28} {'value':>12} {'unit':10} {'baseline':28} {'ratio':>7}")
    for r in records:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else ""
        value = f"{r['value']:.3f}" if r["unit"] == "ms" else f"{r['value']:.0f}"
        print(f"{r['metric']:28} {value:>12} {r['unit']:10} {r['baseline'] or '':28} {ratio:>7}")


def run(args) -> int:
    from dns_resolver.lab import Dnsmasq, RunningResolver, resolver_config
    from lab.topology import Lab

    work = Path(tempfile.mkdtemp(prefix="serval-bench-dns-"))
    service_q = work / "service.txt"
    forward_q = work / "forward.txt"
    service_q.write_text("".join(f"s{i}.svc.example A\n" for i in range(NAMES)))
    forward_q.write_text("".join(f"n{i}.bench.test A\n" for i in range(NAMES)))
    values: dict = {}
    with Lab() as lab:
        dns, load = lab.add_host("dns"), lab.add_host("load")
        _, dns_if = lab.link(load, dns, f"{LOAD}/24", f"{SERVAL}/24")
        for address in (DNSMASQ, ORIGIN):
            dns.run(["ip", "addr", "add", f"{address}/24", "dev", dns_if])
        progress("starting the origin dnsmasq, the caching dnsmasq and serval dns")
        Dnsmasq(dns, ORIGIN, args=["--no-resolv", "--address=/bench.test/198.19.99.1", "--local-ttl=3600"],
                log_dir=str(work)).start()
        Dnsmasq(dns, DNSMASQ, args=["--no-resolv", f"--server={ORIGIN}", "--cache-size=10000"],
                log_dir=str(work)).start()
        config = resolver_config(listen=[SERVAL], allow=["198.19.60.0/24"],
                                 zones={"svc.example": [f"s{i}" for i in range(NAMES)]}, upstreams=[ORIGIN],
                                 mappings=str(work / "mappings.json"), rate=0, timeout=1.0)
        resolver = RunningResolver(dns, config, str(work), log_level="warning").start()
        try:
            progress("warming up (allocations, caches)")
            for server, queries in ((SERVAL, service_q), (SERVAL, forward_q), (DNSMASQ, forward_q)):
                check(dnsperf(load, server, queries, 2, outstanding=1, rate=500), f"warm-up {server}")
            # Phases are interleaved in --rounds slices (service, forward, dnsmasq, service,
            # ...), so a burst of load from elsewhere on the machine hits all three alike.
            qps = [("dns_qps_service", SERVAL, service_q), ("dns_qps_cached_forward", SERVAL, forward_q),
                   ("dns_qps_dnsmasq_cached", DNSMASQ, forward_q)]
            progress(f"throughput: {args.duration:g} s per phase in {args.rounds} rounds, "
                     f"{args.outstanding} outstanding")
            done = {m: [0, 0.0] for m, _, _ in qps}
            for _ in range(args.rounds):
                for metric, server, queries in qps:
                    stats = dnsperf(load, server, queries, args.duration / args.rounds, args.outstanding)
                    check(stats, metric)
                    done[metric][0] += stats["completed"]
                    done[metric][1] += stats["completed"] / stats["qps"]
            for metric, (completed, seconds) in done.items():
                values[metric] = completed / seconds
            latency = [("dns_p99_service", SERVAL, service_q), ("dns_p99_cached_forward", SERVAL, forward_q),
                       ("dns_p99_dnsmasq_cached", DNSMASQ, forward_q)]
            progress(f"latency: {args.latency_duration:g} s per phase in {args.rounds} rounds at {args.rate} queries/s")
            samples = {m: [] for m, _, _ in latency}
            for i in range(args.rounds):
                for metric, server, queries in latency:
                    stats = dnsperf(load, server, queries, args.latency_duration / args.rounds, args.outstanding,
                                    rate=args.rate, verbose_to=work / f"{metric}-{i}.txt")
                    check(stats, metric)
                    samples[metric] += stats["latencies"]
            for metric, latencies in samples.items():
                values[metric] = percentile(latencies, 99) * 1000
                values[metric.replace("p99", "p50")] = percentile(latencies, 50) * 1000
        finally:
            code = resolver.stop()
            if code != 0:
                progress(f"serval dns exited {code}:\n{resolver.log()}")
    records = [
        record("dns_qps_service", values["dns_qps_service"], "queries/s", "dns_qps_dnsmasq_cached", values),
        record("dns_qps_cached_forward", values["dns_qps_cached_forward"], "queries/s", "dns_qps_dnsmasq_cached",
               values),
        record("dns_qps_dnsmasq_cached", values["dns_qps_dnsmasq_cached"], "queries/s"),
        record("dns_p99_service", values["dns_p99_service"], "ms", "dns_p99_dnsmasq_cached", values),
        record("dns_p99_cached_forward", values["dns_p99_cached_forward"], "ms", "dns_p99_dnsmasq_cached", values),
        record("dns_p99_dnsmasq_cached", values["dns_p99_dnsmasq_cached"], "ms"),
        record("dns_p50_service", values["dns_p50_service"], "ms", "dns_p50_dnsmasq_cached", values),
        record("dns_p50_dnsmasq_cached", values["dns_p50_dnsmasq_cached"], "ms"),
    ]
    print_table(records)
    merge(records, Path(args.json))
    progress(f"records merged into {args.json}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dns", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per throughput phase (default 10)")
    p.add_argument("--latency-duration", type=float, default=5.0, help="seconds per latency phase (default 5)")
    p.add_argument("--rate", type=int, default=2000, help="offered load of the latency phases, queries/s")
    p.add_argument("--outstanding", type=int, default=64, help="queries in flight (dnsperf -q)")
    p.add_argument("--rounds", type=int, default=5, help="slices each phase is cut into, interleaved (default 5)")
    p.add_argument("--json", default=str(REPO / "build" / "bench.json"), help="records file to merge into")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.dns: needs root (network namespaces)", file=sys.stderr)
        return 2
    missing = [t for t in ("dnsperf", "dnsmasq", "ip") if shutil.which(t) is None]
    if missing:
        print(f"bench.dns: needs {', '.join(missing)} (apt-get install dnsperf dnsmasq-base)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    start = time.monotonic()
    try:
        code = run(args)
    except BenchError as exc:
        print(f"bench.dns: {exc}", file=sys.stderr)
        return 1
    progress(f"done in {time.monotonic() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
