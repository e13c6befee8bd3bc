"""Hardening benchmark: ``python -m bench.hardening``.

``flood_goodput_ratio``
    one iperf3 flow through the gateway pair while spoofed SYNs (toward the virtual
    address, from the LAN side) and random SAL packets (at the server gateway) flood
    the gateways, divided by the same flow's throughput without the flood, measured
    just before in the same lab.
``sustained_connections_per_second_gateway``
    ``ab -t 60 -c 100`` (a new connection per request, HTTP/1.0, the server closing
    first as web servers do) through the gateway pair by virtual address: requests
    completed per second over 60 s, divided by ``sustained_connections_per_second_direct``,
    the same straight to the server's address over the same hosts routing plainly
    (measured first, gateways not yet running). ``..._failed`` beside each: the requests
    that failed (a refused connect among them). The server closing first holds each
    4-tuple in TIME_WAIT for 60 s, so one of our addresses facing it sustains about
    31,744 / 60 ≈ 530 new connections a second (docs/operations.md, port pool);
    ``sustained_connections_per_second_gateway_4_sources`` runs the same with
    ``source_addresses`` set to four addresses.
``refusal_latency_ms_p99``
    300 connects, one after another, to a virtual address's port that no service
    has: the time until the refusal (RST) arrives, p99. Beside it,
    ``refusal_latency_ms_p99_no_backend``: the same to a service whose backend has
    nothing listening (the refusal crosses both gateways). A connect not refused
    within 3 s counts as 3 s and makes the part fail.

(``restart_flow_survival`` is ``bench.restarts``'s.)

``python -m bench.hardening --part connections`` runs only the last ones (``flood``
only the first three); by default, all. Records are merged into ``build/bench.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from lab.topology import Lab
from tests.integration.helpers import wait_port
from tests.integration.test_flood import FLOOD
from bench.records import run_part

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
HTTP_PORT = 8080                        # the backend of the pair's web service (virtual :80)
SUSTAIN_SECONDS, CONCURRENCY = 60, 100
SOURCE_ADDRESSES = ["198.19.3.1", "198.19.3.5", "198.19.3.6", "198.19.3.7"]   # the server gateway's, facing the server
REFUSALS = 300
UNSERVED_PORT = 81                      # a port the virtual address has no service on
DEAD_BACKEND = ("dead.svc.example", 82, VIRTUAL_ADDR, 8099)     # nothing listens on 8099


def progress(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def iperf_gbps(pair, seconds: int = 4) -> float:
    r = pair.client.run(["iperf3", "-c", VIRTUAL_ADDR, "-p", "80", "-t", str(seconds), "-J"],
                        check=False, timeout=seconds + 30)
    if r.returncode:
        raise RuntimeError(f"iperf3 failed: {r.stdout[-300:]}{r.stderr}")
    return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9


def run_flood(work: Path) -> list[dict]:
    with Lab() as lab:
        progress(f"building the lab ({lab.prefix}-*)")
        pair = gateway_pair(lab, server_route_back=False)
        pair.server.popen(["iperf3", "-s", "-p", "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gws = RunningGateways(pair).start()
        try:
            progress("iperf3 through the gateways, no flood")
            quiet = iperf_gbps(pair)
            progress("the same with a flood of 200,000 spoofed SYNs and 200,000 random SAL packets")
            floods = [pair.client.popen([sys.executable, "-c", FLOOD, "syn", VIRTUAL_ADDR, "200000"],
                                        stdout=subprocess.DEVNULL),
                      pair.cgw.popen([sys.executable, "-c", FLOOD, "sal", pair.sgw_sal, "200000"],
                                     stdout=subprocess.DEVNULL)]
            time.sleep(0.3)
            flooded = iperf_gbps(pair)
            for f in floods:
                f.kill()
                f.wait(10)
        finally:
            codes = gws.stop()
        if codes != {"client": 0, "server": 0}:
            raise RuntimeError(f"gateways exited {codes}")
    return [
        {"metric": "throughput_gateway_pair_quiet", "value": round(quiet, 3), "unit": "Gbit/s",
         "baseline": None, "ratio": None},
        {"metric": "flood_goodput_ratio", "value": round(flooded / quiet, 3), "unit": "ratio",
         "baseline": "throughput_gateway_pair_quiet", "ratio": round(flooded / quiet, 3)},
    ]


def ab_sustained(client, url: str) -> tuple[float, int]:
    """(requests completed per second, requests failed) of ``ab -t SUSTAIN_SECONDS -c
    CONCURRENCY``, a new connection each; ``-r`` keeps ab going past a failed one."""
    r = client.run(["ab", "-q", "-t", str(SUSTAIN_SECONDS), "-n", "100000000", "-c", str(CONCURRENCY),
                    "-s", "10", "-r", url], check=False, timeout=SUSTAIN_SECONDS + 120)
    complete = re.search(r"Complete requests:\s+(\d+)", r.stdout)
    failed = re.search(r"Failed requests:\s+(\d+)", r.stdout)
    taken = re.search(r"Time taken for tests:\s+([\d.]+)", r.stdout)
    if r.returncode or not complete or not taken:
        raise RuntimeError(f"ab {url}: exit {r.returncode}: {(r.stdout + r.stderr)[-400:]}")
    failures = int(failed.group(1)) if failed else 0
    # ab counts a failed connect or receive beside the complete requests, a wrong
    # length among them
    wrong_length = re.search(r"Length:\s*(\d+)", r.stdout)
    good = int(complete.group(1)) - (int(wrong_length.group(1)) if wrong_length else 0)
    return good / float(taken.group(1)), failures


def refusal(client, addr: str, port: int) -> dict:
    r = client.run([sys.executable, str(BENCH / "refusal_probe.py"), addr, str(port),
                    "--count", str(REFUSALS)], check=False, timeout=REFUSALS * 3 + 30)
    if r.returncode:
        raise RuntimeError(f"refusal probe {addr}:{port}: exit {r.returncode}: {r.stderr[-400:]}")
    result = json.loads(r.stdout)
    unrefused = {k: v for k, v in result["kinds"].items() if k in ("timeout", "accepted")}
    if unrefused:
        raise RuntimeError(f"connects to {addr}:{port} not refused: {unrefused} of {REFUSALS}")
    return result


def run_connections(work: Path) -> list[dict]:
    if not shutil.which("ab"):
        raise RuntimeError("ab (apache2-utils) is not installed")
    with Lab() as lab:
        progress(f"building the lab ({lab.prefix}-*)")
        pair = gateway_pair(lab, server_route_back=True)
        pair.server.popen([sys.executable, str(BENCH / "tiny_http.py"), str(HTTP_PORT)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(pair.server, "0.0.0.0", HTTP_PORT)
        progress(f"ab -t {SUSTAIN_SECONDS} -c {CONCURRENCY} straight to the server (hosts routing plainly)")
        direct = ab_sustained(pair.client, f"http://{pair.server_addr}:{HTTP_PORT}/")
        progress(f"  {direct[0]:.0f} conn/s, {direct[1]} failed")
        gws = RunningGateways(pair, extra_services=[DEAD_BACKEND]).start()
        try:
            progress("the same through the gateway pair, by virtual address (one source address)")
            through = ab_sustained(pair.client, f"http://{VIRTUAL_ADDR}/")
            progress(f"  {through[0]:.0f} conn/s, {through[1]} failed; server gateway: "
                     + ", ".join(f"{k} {gws.stats('server').get(k, 0)}" for k in
                                 ("refused_ports_exhausted", "ports_reused_in_time_wait", "backend_time_wait_reset",
                                  "ports_back_after_time_wait", "ports_back_at_once")))
            progress(f"{REFUSALS} connects to {VIRTUAL_ADDR}:{UNSERVED_PORT} (no service), then to a "
                     "service whose backend has nothing listening")
            unserved = refusal(pair.client, VIRTUAL_ADDR, UNSERVED_PORT)
            dead = refusal(pair.client, VIRTUAL_ADDR, DEAD_BACKEND[1])
        finally:
            codes = gws.stop()
        if codes != {"client": 0, "server": 0}:
            raise RuntimeError(f"gateways exited {codes}")
        # the same with four of our addresses facing the server, after its TIME_WAITs of
        # the run above: a fresh lab would cost a minute more, and the pool walks from a
        # random place in any case
        for addr in SOURCE_ADDRESSES[1:]:
            pair.sgw.run(["ip", "addr", "add", f"{addr}/24", "dev", pair.sgw_lan_if])
        gws = RunningGateways(pair)
        server_cfg = gws.configs["server"]
        server_cfg.write_text(server_cfg.read_text().replace(
            "[gateway]\n", f"[gateway]\nsource_addresses = {json.dumps(SOURCE_ADDRESSES)}\n", 1))
        gws.start()
        try:
            progress(f"the same with {len(SOURCE_ADDRESSES)} source addresses toward the server")
            four = ab_sustained(pair.client, f"http://{VIRTUAL_ADDR}/")
            progress(f"  {four[0]:.0f} conn/s, {four[1]} failed; server gateway: "
                     + ", ".join(f"{k} {gws.stats('server').get(k, 0)}" for k in
                                 ("refused_ports_exhausted", "ports_reused_in_time_wait", "backend_time_wait_reset")))
        finally:
            codes = gws.stop()
        if codes != {"client": 0, "server": 0}:
            raise RuntimeError(f"gateways exited {codes}")

    def rate(metric, measured, baseline=None):
        return [{"metric": metric, "value": round(measured[0]), "unit": "conn/s", "baseline": baseline,
                 "ratio": round(measured[0] / direct[0], 3) if baseline else None},
                {"metric": f"{metric}_failed", "value": measured[1], "unit": "requests",
                 "baseline": None, "ratio": None}]

    base = "sustained_connections_per_second_direct"
    return [
        *rate(base, direct),
        *rate("sustained_connections_per_second_gateway", through, base),
        *rate("sustained_connections_per_second_gateway_4_sources", four, base),
        {"metric": "refusal_latency_ms_p99", "value": round(unserved["p99_ms"], 3), "unit": "ms",
         "baseline": None, "ratio": None},
        {"metric": "refusal_latency_ms_p99_no_backend", "value": round(dead["p99_ms"], 3), "unit": "ms",
         "baseline": None, "ratio": None},
    ]


PARTS = {"flood": run_flood, "connections": run_connections}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="hardening benchmark")
    ap.add_argument("--part", choices=["all", *PARTS], default="all")
    part = ap.parse_args(argv).part
    chosen = list(PARTS.values()) if part == "all" else [PARTS[part]]

    def run(work: Path) -> list[dict]:
        records = []
        for part in chosen:
            folder = work / part.__name__
            folder.mkdir()
            records += part(folder)
        return records

    return run_part(run, "serval-bench-hard-", 40)


if __name__ == "__main__":
    sys.exit(main())
