"""Flows through a gateway restart: ``python -m bench.restarts``.

    client --- cgw === SAL === sgw --- server (bench/sha_flows.py serve)

``restart_flow_survival_client_gateway``, ``restart_flow_survival_server_gateway``
    100 flows at once through the pair (50 downloads, 50 uploads, 2 MB each at
    100 kB/s, so each lasts about 20 s); when they have run 12 s (longer than the
    snapshot interval, so a snapshot's age is not the flow's), the gateway is killed
    (``kill -9``), left down 20 s, and started again. The fraction of flows that then
    move every byte intact (SHA-256 checked by the other end). The gateways run with
    the default fast path, so the kernel carries the flows' data while the daemon is
    down; their closes, which only the daemon handles, wait for the restart.
``restart_flow_survival``
    The lower of the two (the issue's goal: 1.0).

Records are merged into ``build/bench.json``.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.records import run_part
from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from lab.topology import Lab
from tests.integration.helpers import wait_port

FLOWS_SCRIPT = Path(__file__).resolve().parent / "sha_flows.py"
DOWNLOADS = UPLOADS = 50
SIZE, RATE = 2_000_000, 100_000          # bytes, bytes/s: about 20 s a flow
AGE_AT_KILL, OUTAGE = 12.0, 20.0         # seconds (the goal: a restart within 30 s)


def progress(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def through_a_restart(pair, gws, role: str) -> dict:
    """The flows of ``sha_flows.py run`` while ``role``'s gateway is killed and started."""
    flows = pair.client.popen([sys.executable, str(FLOWS_SCRIPT), "run", VIRTUAL_ADDR, "80", str(DOWNLOADS),
                               str(UPLOADS), str(SIZE), str(RATE)], stdout=subprocess.PIPE, text=True)
    if flows.stdout.readline().strip() != "started":
        raise RuntimeError(f"the flows did not start: {flows.communicate(timeout=30)}")
    started = time.monotonic()
    time.sleep(AGE_AT_KILL)                  # the flows' age at the kill is what is measured
    gws.signal(role, signal.SIGKILL)
    gws.procs[role].wait(5)
    progress(f"{role} gateway killed after {time.monotonic() - started:.1f} s; down for {OUTAGE:.0f} s")
    time.sleep(OUTAGE)
    gws.launch(role)
    resumed = [line for line in gws.log(role).splitlines() if "resumed" in line]
    progress(f"{role} gateway started again: {resumed[-1].strip() if resumed else 'no resume line'}")
    out, _ = flows.communicate(timeout=180)
    result = json.loads(out.strip().splitlines()[-1])
    progress(f"  {result['ok']} of {DOWNLOADS + UPLOADS} flows intact; errors: {result['errors']}")
    return result


def run(work: Path) -> list[dict]:
    with Lab() as lab:
        progress(f"building the lab ({lab.prefix}-*)")
        pair = gateway_pair(lab, server_route_back=False, wire=True)
        pair.server.popen([sys.executable, str(FLOWS_SCRIPT), "serve", "8080"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(pair.server, "0.0.0.0", 8080)
        gws = RunningGateways(pair).start()
        survival = {}
        try:
            for role in ("client", "server"):
                progress(f"{DOWNLOADS} downloads and {UPLOADS} uploads through the pair; "
                         f"the {role} gateway is killed at {AGE_AT_KILL:.0f} s")
                result = through_a_restart(pair, gws, role)
                survival[role] = result["ok"] / (DOWNLOADS + UPLOADS)
        finally:
            codes = gws.stop()
        if codes != {"client": 0, "server": 0}:
            raise RuntimeError(f"gateways exited {codes}")
    return [
        {"metric": "restart_flow_survival_client_gateway", "value": survival["client"], "unit": "fraction",
         "baseline": None, "ratio": None},
        {"metric": "restart_flow_survival_server_gateway", "value": survival["server"], "unit": "fraction",
         "baseline": None, "ratio": None},
        {"metric": "restart_flow_survival", "value": min(survival.values()), "unit": "fraction",
         "baseline": None, "ratio": None},
    ]


def main() -> int:
    return run_part(run, "serval-bench-restarts-", 40)


if __name__ == "__main__":
    sys.exit(main())
