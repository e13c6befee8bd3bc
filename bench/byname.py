"""``ab -n 50000 -c 100`` by name through the whole deployment: the client looks the
service up in the resolver on its gateway and connects to the virtual address it gets;
the client gateway sends each SYN to a service router, which picks one of two replicas
behind their server gateways (the demo's world, lab/demo_world.py). A new connection per
request. Beside it, the same ab from one server gateway's host straight to its replica
(no gateway, no router).

Records (merged into build/bench.json):

``ab_by_name_failed_requests``
    ab's failed requests plus those it never completed; the goal is 0.
``ab_by_name_requests_per_second``
    Requests per second through the deployment; baseline ``ab_direct_requests_per_second``.
``ab_direct_requests_per_second``
    The same ab straight to one replica. The replicas run bench/tiny_http.py (the demo's
    python -m http.server has a listen backlog of 5, which loses SYNs under -c 100).

``--requests`` and ``--concurrency`` change the load (default 50000 and 100).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.records import merge, table
from lab.demo import Run
from lab.demo_world import BACKEND_PORT
from lab.routed import SERVICE


BENCH = Path(__file__).resolve().parent


def progress(msg: str) -> None:
    print(f"[bench.byname] {msg}", flush=True)


def ab(host, url: str, requests: int, concurrency: int) -> dict:
    """ab's own counts: complete, failed (by kind), requests per second."""
    r = host.run(["ab", "-q", "-r", "-s", "10", "-n", str(requests), "-c", str(concurrency), url],
                 check=False, timeout=600)
    out = r.stdout

    def number(label: str) -> float:
        m = re.search(rf"^{label}:\s+([\d.]+)", out, re.M)
        return float(m.group(1)) if m else 0.0

    return {"complete": int(number("Complete requests")), "failed": int(number("Failed requests")),
            "rps": number("Requests per second"), "exit": r.returncode,
            "tail": (out + r.stderr)[-600:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.byname", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=50000)
    ap.add_argument("--concurrency", type=int, default=100)
    args = ap.parse_args(argv)
    if shutil.which("ab") is None:
        print("[bench.byname] needs ab (apache2-utils: make bench-deps)", file=sys.stderr)
        return 2
    run = Run()
    records, failed = [], False
    try:
        t0 = time.monotonic()
        world = run.world()
        # the demo's replicas run python -m http.server, whose listen backlog of 5 loses
        # SYNs under ab -c 100 (direct too): a server that keeps up takes their place
        for i, proc in world.backends.items():
            proc.kill()
            proc.wait()
            tiny = world.topo.servers[i].popen([sys.executable, str(BENCH / "tiny_http.py"), str(BACKEND_PORT)],
                                               stdout=subprocess.PIPE, text=True)
            if tiny.stdout.readline().strip() != "ready":
                raise RuntimeError(f"bench/tiny_http.py did not start on srv{i}")
            world.backends[i] = tiny
        progress(f"deployment up in {time.monotonic() - t0:.0f} s; ab -n {args.requests} -c {args.concurrency} "
                 f"http://{SERVICE}/ from the client")
        through = ab(world.topo.client, f"http://{SERVICE}/", args.requests, args.concurrency)
        lost = args.requests - through["complete"] + through["failed"]
        progress(f"by name: {through['complete']} complete, {through['failed']} failed, "
                 f"{through['rps']:.0f} requests/s")
        if through["exit"] or lost:
            progress("ab said: " + through["tail"].replace("\n", " | "))
        srv = world.topo.servers[0]
        direct = ab(world.dep.hosts["sgw0"], f"http://{world.topo.server_addr(0)}:{BACKEND_PORT}/",
                    args.requests, args.concurrency)
        progress(f"direct: {direct['complete']} complete, {direct['failed']} failed, {direct['rps']:.0f} requests/s"
                 f" ({srv.name})")
        if direct["exit"] or not direct["complete"]:
            progress("ab said: " + direct["tail"].replace("\n", " | "))
        rps = through["rps"]
        records = [
            {"metric": "ab_by_name_failed_requests", "value": lost, "unit": "requests", "baseline": None,
             "ratio": None},
            {"metric": "ab_by_name_requests_per_second", "value": round(rps, 1), "unit": "req/s",
             "baseline": "ab_direct_requests_per_second",
             "ratio": rps / direct["rps"] if direct["rps"] else None},
            {"metric": "ab_direct_requests_per_second", "value": round(direct["rps"], 1), "unit": "req/s",
             "baseline": None, "ratio": None},
        ]
        failed = bool(lost)
    except Exception as exc:  # noqa: BLE001 - the lab failed: say so, clean up, exit 1
        progress(f"FAILED: {type(exc).__name__}: {exc}")
        run.log_tails()
        failed = True
    finally:
        problems = run.close()
        for p in problems:
            progress(f"left behind: {p}")
    if records:
        print()
        print(table(records))
        merge(records)
        progress("merged into build/bench.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
