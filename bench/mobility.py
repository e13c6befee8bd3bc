"""Migration benchmark: ``python -m bench.mobility``.

In one lab (client --- cgw === sgw --- server), iperf3 streams run from the server to
the client through the gateway pair (``-R``: the server's TCP always has data to send,
so no application pause hides in the gap) while the client gateway's SAL address is
replaced (``ip addr add`` new, ``del`` old). A capture on the server gateway's SAL link
gives, per stream, the time from the last data packet sent to the old address to the
first sent to the new one:

``migration_gap_ms``            one stream
``migration_gap_ms_p50/p99``    100 parallel streams (``iperf3 -P 100``) moving at once
``legacy_tcp_timeouts_during_migration``
    retransmission timeouts the legacy client's and server's own TCP counted over both
    phases (``nstat`` TcpExtTCPTimeouts in their namespaces): what the move cost them.

Results are merged into ``build/bench.json`` (records of the same metric replaced).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from lab.topology import Lab
from sal import pcap as pcapmod

REPO = Path(__file__).resolve().parent.parent


def progress(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def timeouts(host) -> int:
    out = host.run(["nstat", "-az", "TcpExtTCPTimeouts"], check=False).stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("TcpExtTCPTimeouts"))


def gaps(pcap: Path, old: str, new: str) -> list[float]:
    """Per flow (client's flowID): first data packet to ``new`` minus last to ``old``, ms."""
    old_b, new_b = socket.inet_aton(old), socket.inet_aton(new)
    last_old, first_new = {}, {}
    for ts, pkt in pcapmod.read_pcap(pcap.read_bytes()):
        if pkt is None or len(pkt) < 40 or pkt[9] != 144 or pkt[28] != 3:
            continue                      # only SAL data: base header, no extensions
        ihl = (pkt[0] & 15) * 4
        tcp = ihl + 12
        if int.from_bytes(pkt[2:4], "big") - tcp - (pkt[tcp + 12] >> 4) * 4 <= 0:
            continue                      # a pure ACK, not data
        fid = pkt[ihl + 4:ihl + 8]
        if pkt[16:20] == old_b:
            last_old[fid] = ts
        elif pkt[16:20] == new_b and fid not in first_new:
            first_new[fid] = ts
    return [(first_new[f] - last_old[f]) * 1000 for f in first_new if f in last_old]


def capture(pair, path: Path):
    proc = pair.sgw.popen(["tcpdump", "-U", "-s", "96", "-ni", pair.sgw_sal_if, "-w", str(path), "ip proto 144"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def wait_size(path: Path, size: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= size:
            return
        time.sleep(0.02)
    raise RuntimeError(f"{path} did not reach {size} bytes")


def move(pair, old: str, new: str) -> None:
    pair.cgw.run(["ip", "addr", "add", f"{new}/24", "dev", pair.cgw_sal_if])
    pair.cgw.run(["ip", "addr", "del", f"{old}/24", "dev", pair.cgw_sal_if])


def streams(pair, parallel: int, old: str, new: str, pcap: Path, seconds: int = 4) -> list[float]:
    """iperf3 -R with ``parallel`` streams; the address moves 1.5 s in. Gaps per stream."""
    dump = capture(pair, pcap)
    client = pair.client.popen(["iperf3", "-c", VIRTUAL_ADDR, "-p", "80", "-R", "-t", str(seconds),
                                "-P", str(parallel)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)
    move(pair, old, new)
    out, _ = client.communicate(timeout=seconds + 30)
    if client.returncode != 0:
        raise RuntimeError(f"iperf3 failed: {out[-500:]}")
    time.sleep(0.3)
    dump.terminate()
    dump.wait(5)
    return sorted(gaps(pcap, old, new))


def run(work: Path) -> list[dict]:
    with Lab() as lab:
        progress(f"building the lab ({lab.prefix}-*)")
        pair = gateway_pair(lab, server_route_back=False)
        for gw in (pair.cgw, pair.sgw):
            gw.sysctl("net.ipv4.conf.all.promote_secondaries", 1)
        pair.server.popen(["iperf3", "-s", "-p", "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gws = RunningGateways(pair).start()
        try:
            rto_before = timeouts(pair.client) + timeouts(pair.server)
            progress("one iperf3 stream; the client gateway's address is replaced 1.5 s in")
            one = streams(pair, 1, pair.cgw_sal, "198.19.2.11", work / "one.pcap")
            progress("100 parallel streams; the address is replaced again")
            many = streams(pair, 100, "198.19.2.11", "198.19.2.21", work / "many.pcap")
            rtos = timeouts(pair.client) + timeouts(pair.server) - rto_before
            stats = gws.stats("client")
        finally:
            codes = gws.stop()
        if codes != {"client": 0, "server": 0}:
            raise RuntimeError(f"gateways exited {codes}")
    if not one or len(many) < 90:
        raise RuntimeError(f"too few streams seen moving in the captures ({len(one)}, {len(many)})")
    p99 = many[min(len(many) - 1, len(many) * 99 // 100)]
    return [
        {"metric": "migration_gap_ms", "value": round(max(one), 2), "unit": "ms", "baseline": None, "ratio": None},
        {"metric": "migration_gap_ms_p50", "value": round(statistics.median(many), 2), "unit": "ms",
         "baseline": None, "ratio": None},
        {"metric": "migration_gap_ms_p99", "value": round(p99, 2), "unit": "ms", "baseline": None, "ratio": None},
        {"metric": "legacy_tcp_timeouts_during_migration", "value": rtos, "unit": "timeouts",
         "baseline": None, "ratio": None},
        {"metric": "migration_confirm_ms_p50", "value": stats.get("migration_ms_p50"), "unit": "ms",
         "baseline": None, "ratio": None},
    ]


def merge(records: list[dict], path: Path) -> None:
    old = json.loads(path.read_text()) if path.exists() else []
    names = {r["metric"] for r in records}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r for r in old if r["metric"] not in names] + records, indent=2) + "\n")


def main() -> int:
    if os.geteuid() != 0:
        print("[bench] needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="serval-bench-mob-") as work:
        try:
            records = run(Path(work))
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            print(f"[bench] FAILED: {exc}", file=sys.stderr)
            return 1
    print()
    for r in records:
        print(f"{r['metric']:40} {r['value']:>10} {r['unit']}")
    merge(records, REPO / "build" / "bench.json")
    progress("merged into build/bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
