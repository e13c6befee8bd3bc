"""Where the gateway's time goes: ``python -m bench.profile [--role client|server]``.

Builds the same lab as ``bench.run``, starts the gateway pair with one gateway (the
client's by default) under cProfile, drives an iperf3 flow (or, with ``--workload
connect``, a burst of sequential connects) through it, stops the gateways cleanly (so
cProfile writes its data) and prints the top functions by self time and by cumulative
time. cProfile adds a fixed cost per Python call, so it inflates call-heavy code; read
the shares rather than the absolute times. Run it as a module (``-m bench.profile``),
never as ``python bench/profile.py``: that would put bench/ first on sys.path, where
this file would shadow the standard library's ``profile`` that cProfile imports.
"""
from __future__ import annotations

import argparse
import io
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.gateways import VIRTUAL_ADDR, GatewayError, RunningGateways
from lab.topologies import gateway_pair
from lab.topology import Lab

from bench.run import (TINY_PORT, TINY_SERVICE_PORT, BenchError, iperf, latency, progress,
                       start_servers)


def profiled(host, out: Path) -> None:
    """Make ``host.popen`` start ``python -m serval ...`` under ``python -m cProfile``."""
    plain = host.popen

    def popen(argv, **kw):
        argv = list(argv)
        if argv[1:3] == ["-m", "serval"]:
            argv = [argv[0], "-m", "cProfile", "-o", str(out), *argv[1:]]
        return plain(argv, **kw)

    host.popen = popen          # this Host instance only


def report(path: Path, top: int) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    stats.strip_dirs()
    for key, title in (("tottime", "self time"), ("cumulative", "cumulative time")):
        buf.write(f"\n===== top {top} by {title} =====\n")
        stats.sort_stats(key).print_stats(top)
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Profile one gateway of the pair under load.")
    ap.add_argument("--role", choices=("client", "server"), default="client")
    ap.add_argument("--workload", choices=("iperf", "connect"), default="iperf")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 duration (1..30)")
    ap.add_argument("--connects", type=int, default=1000, help="connects for --workload connect (1..5000)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    if not (1 <= args.seconds <= 30 and 1 <= args.connects <= 5000):
        ap.error("keep it small: seconds 1..30, connects 1..5000")
    out = Path(tempfile.mkdtemp(prefix="serval-prof-")) / f"{args.role}.prof"
    try:
        with Lab() as lab:
            progress(f"building the lab ({lab.prefix}-*)")
            pair = gateway_pair(lab, server_route_back=True)
            start_servers(pair)
            profiled(pair.cgw if args.role == "client" else pair.sgw, out)
            gws = RunningGateways(pair, carriage="ip", extra_services=[
                ("echo.svc.example", TINY_SERVICE_PORT, VIRTUAL_ADDR, TINY_PORT)])
            try:
                gws.start(timeout=30)
                t0 = time.monotonic()
                if args.workload == "iperf":
                    progress(f"profiling the {args.role} gateway during iperf3 -t {args.seconds}")
                    r = iperf(pair, VIRTUAL_ADDR, 80, args.seconds)
                    progress(f"throughput under cProfile: {r['gbps']:.3f} Gbit/s")
                else:
                    progress(f"profiling the {args.role} gateway during {args.connects} connects")
                    r = latency(pair, VIRTUAL_ADDR, TINY_SERVICE_PORT, args.connects)
                    progress(f"connect p50 under cProfile: {r['p50_ms']:.3f} ms")
                progress(f"load ran {time.monotonic() - t0:.1f} s; gateway stats: "
                         f"{gws.stats(args.role)}")
            finally:
                codes = gws.stop(timeout=30)
            if codes.get(args.role) != 0:
                raise BenchError(f"{args.role} gateway exited {codes.get(args.role)}:\n{gws.log(args.role)}")
        if not out.exists():
            raise BenchError(f"cProfile wrote no {out}")
    except (BenchError, GatewayError, subprocess.SubprocessError, OSError) as exc:
        print(f"[bench] FAILED: {exc}", file=sys.stderr)
        return 1
    print(report(out, args.top))
    progress(f"profile data: {out} (python -m pstats {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
