"""Hardening benchmark: ``python -m bench.hardening``.

``flood_goodput_ratio``
    one iperf3 flow through the gateway pair while spoofed SYNs (toward the virtual
    address, from the LAN side) and random SAL packets (at the server gateway) flood
    the gateways, divided by the same flow's throughput without the flood, measured
    just before in the same lab.
``restart_flow_survival``
    20 downloads in flight; the client gateway is killed (``kill -9``) and started
    again; the fraction of downloads that still complete with the right bytes.

Records are merged into ``build/bench.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from lab.topology import Lab
from tests.integration.test_flood import FLOOD
from bench.records import run_part

REPO = Path(__file__).resolve().parent.parent


def progress(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def iperf_gbps(pair, seconds: int = 4) -> float:
    r = pair.client.run(["iperf3", "-c", VIRTUAL_ADDR, "-p", "80", "-t", str(seconds), "-J"],
                        check=False, timeout=seconds + 30)
    if r.returncode:
        raise RuntimeError(f"iperf3 failed: {r.stdout[-300:]}{r.stderr}")
    return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9


def run(work: Path) -> list[dict]:
    www = work / "www"
    www.mkdir()
    blob = os.urandom(8 * 1024 * 1024)
    (www / "8MB.bin").write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    with Lab() as lab:
        progress(f"building the lab ({lab.prefix}-*)")
        pair = gateway_pair(lab, server_route_back=False)
        pair.server.popen(["iperf3", "-s", "-p", "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pair.server.popen([sys.executable, "-m", "http.server", "8081", "-d", str(www)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gws = RunningGateways(pair, extra_services=[("files.svc.example", 81, "198.18.0.11", 8081)]).start()
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
            progress("20 downloads in flight; the client gateway is killed (-9) and started again")
            time.sleep(6)                           # let the flood's half-open flows expire or be evicted
            outs = [work / f"d{i}" for i in range(20)]
            dls = [pair.client.popen(["curl", "-sS", "--fail", "-m", "60", "--limit-rate", "2M", "-o", str(o),
                                      "http://198.18.0.11:81/8MB.bin"], stderr=subprocess.DEVNULL) for o in outs]
            time.sleep(2.0)                         # all running, and a snapshot (every second) written
            gws.signal("client", signal.SIGKILL)
            gws.procs["client"].wait(5)
            gws.launch("client")
            for d in dls:
                d.wait(90)
            survived = sum(1 for o in outs if o.exists() and hashlib.sha256(o.read_bytes()).hexdigest() == digest)
        finally:
            codes = gws.stop()
        if codes != {"client": 0, "server": 0}:
            raise RuntimeError(f"gateways exited {codes}")
    return [
        {"metric": "throughput_gateway_pair_quiet", "value": round(quiet, 3), "unit": "Gbit/s",
         "baseline": None, "ratio": None},
        {"metric": "flood_goodput_ratio", "value": round(flooded / quiet, 3), "unit": "ratio",
         "baseline": "throughput_gateway_pair_quiet", "ratio": round(flooded / quiet, 3)},
        {"metric": "restart_flow_survival", "value": survived / len(outs), "unit": "fraction",
         "baseline": None, "ratio": None},
    ]


def main() -> int:
    return run_part(run, "serval-bench-hard-", 34)


if __name__ == "__main__":
    sys.exit(main())
