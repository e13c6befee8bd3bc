"""Real networks benchmark: ``python -m bench.realnet [--connects 100] [--rtt 2]``.

In one lab (client --- cgw === mid === sgw --- server, ``lab.impair`` delaying packets),
``--connects`` connections are opened at once from the legacy client, each a whole
exchange (connect, a request, its answer, close), first direct (plain routed TCP, no
gateways running), then through the gateway pair, over the same delayed path:

``long_rtt_connect_success``
    the fraction that succeeded through the gateway pair at ``--rtt`` seconds of round
    trip added on the middle router (half each way); baseline
    ``long_rtt_connect_success_direct``, the same direct.
``long_rtt_connect_success_client_link``
    the same with the delay on the legacy client's own link (a satellite or mobile
    access link: the client's repeated SYNs reach its gateway after the SAL handshake);
    baseline ``long_rtt_connect_success_client_link_direct``.

Records are merged into ``build/bench.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.records import run_part
from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.impair import delay_path
from lab.topologies import gateway_pair
from lab.topology import Lab

REPO = Path(__file__).resolve().parent.parent
BACKEND_PORT = 8080

# run in the client's namespace: N exchanges at once, one JSON line of results
CONNECTS_PY = r'''
import json, socket, sys, threading, time
from collections import Counter
host, port, n, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
results = [None] * n
def one(i):
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET\n")
            got = b""
            while not got.endswith(b"\n"):
                chunk = s.recv(64)
                if not chunk:
                    raise ConnectionError("closed before the answer")
                got += chunk
        results[i] = ("ok" if got == b"OK\n" else "bad answer", time.monotonic() - t0)
    except OSError as exc:
        results[i] = (type(exc).__name__, time.monotonic() - t0)
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
ok = sorted(t for r, t in results if r == "ok")
print(json.dumps({"ok": len(ok), "n": n, "errors": dict(Counter(r for r, _ in results if r != "ok")),
                  "p50_s": ok[len(ok) // 2] if ok else None, "max_s": ok[-1] if ok else None}))
'''


def progress(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def exchanges(pair, host: str, port: int, n: int, timeout: float) -> dict:
    r = pair.client.run([sys.executable, "-c", CONNECTS_PY, host, str(port), str(n), str(timeout)],
                        check=False, timeout=timeout * 3 + 60)
    if r.returncode:
        raise RuntimeError(f"the connect probe failed: {r.stderr[-800:]}")
    return json.loads(r.stdout)


def run(work: Path, connects: int = 100, rtt: float = 2.0) -> list[dict]:
    timeout = max(30.0, 10 * rtt)          # a legacy client's patience: several SYN retries
    records = []
    with Lab() as lab:
        progress(f"building the lab ({lab.prefix}-*)")
        pair = gateway_pair(lab, middle=True, wire=True)
        pair.server.popen([sys.executable, str(REPO / "bench" / "tiny_server.py"), str(BACKEND_PORT)],
                          stdout=open(work / "server.log", "w"))
        for where, suffix in (("mid", ""), ("client", "_client_link")):
            metric = f"long_rtt_connect_success{suffix}"
            delayer = delay_path(pair, rtt, where).start()
            try:
                progress(f"{rtt:g} s RTT on the {where} link: {connects} exchanges at once, direct")
                direct = exchanges(pair, pair.server_addr, BACKEND_PORT, connects, timeout)
                progress(f"  {direct}")
                progress("  the same through the gateway pair")
                gws = RunningGateways(pair, backend_port=BACKEND_PORT).start()
                try:
                    through = exchanges(pair, VIRTUAL_ADDR, 80, connects, timeout)
                finally:
                    codes = gws.stop()
                progress(f"  {through}")
                if codes != {"client": 0, "server": 0}:
                    raise RuntimeError(f"gateways exited {codes}")
            finally:
                delayer.stop()
            d, t = direct["ok"] / connects, through["ok"] / connects
            records += [
                {"metric": f"{metric}_direct", "value": d, "unit": "fraction", "baseline": None, "ratio": None},
                {"metric": metric, "value": t, "unit": "fraction", "baseline": f"{metric}_direct",
                 "ratio": round(t / d, 3) if d else None},
            ]
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.realnet", description=__doc__.split("\n\n")[0])
    ap.add_argument("--connects", type=int, default=100, help="exchanges at once (default 100)")
    ap.add_argument("--rtt", type=float, default=2.0, help="round trip added, seconds (default 2)")
    args = ap.parse_args(argv)
    if not 1 <= args.connects <= 1000 or not 0 < args.rtt <= 10:
        ap.error("--connects 1..1000, --rtt in (0, 10]")
    return run_part(lambda work: run(work, args.connects, args.rtt), "serval-bench-realnet-", 46)


if __name__ == "__main__":
    sys.exit(main())
