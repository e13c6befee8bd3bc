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
    retransmission timeouts the legacy client's and server's own TCP counted while one
    stream moved (``nstat`` TcpExtTCPTimeouts in their namespaces): what the move cost.
``legacy_tcp_timeouts_100_streams_moving`` / ``..._no_move``
    the same for the 100 streams, with the same load run once without a move beside it.

Results are merged into ``build/bench.json`` (records of the same metric replaced).
"""
from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from lab.topology import Lab
from sal import pcap as pcapmod
from bench.records import run_part

REPO = Path(__file__).resolve().parent.parent


def progress(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def timeouts(host) -> int:
    out = host.run(["nstat", "-az", "TcpExtTCPTimeouts"], check=False).stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("TcpExtTCPTimeouts"))


def gaps(pcap: Path, old: str, new: str, busy: int = 50) -> list[float]:
    """Per flow (client's flowID): first data packet to ``new`` minus last to ``old``, ms;
    only flows with at least ``busy`` data packets each side (not iperf3's control
    connection, which is idle in the middle)."""
    old_b, new_b = socket.inet_aton(old), socket.inet_aton(new)
    last_old, first_new, count = {}, {}, {}
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
            count[fid, 0] = count.get((fid, 0), 0) + 1
        elif pkt[16:20] == new_b:
            first_new.setdefault(fid, ts)
            count[fid, 1] = count.get((fid, 1), 0) + 1
    return [(first_new[f] - last_old[f]) * 1000 for f in first_new
            if f in last_old and min(count.get((f, 0), 0), count.get((f, 1), 0)) >= busy]


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


def streams(pair, parallel: int, old: str, new: str | None, pcap: Path, seconds: int = 4,
            rate: str | None = None) -> list[float]:
    """iperf3 -R with ``parallel`` streams; the address moves 1.5 s in (unless ``new`` is
    None: the same load without a move, as a baseline). Gaps per stream."""
    dump = capture(pair, pcap)
    client = pair.client.popen(["iperf3", "-c", VIRTUAL_ADDR, "-p", "80", "-R", "-t", str(seconds),
                                "-P", str(parallel), *(["-b", rate] if rate else [])],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)
    if new is not None:
        move(pair, old, new)
    out, _ = client.communicate(timeout=seconds + 30)
    if client.returncode != 0:
        raise RuntimeError(f"iperf3 failed: {out[-500:]}")
    time.sleep(0.3)
    dump.terminate()
    dump.wait(5)
    return sorted(gaps(pcap, old, new)) if new is not None else []


def run(work: Path) -> list[dict]:
    with Lab() as lab:
        progress(f"building the lab ({lab.prefix}-*)")
        pair = gateway_pair(lab, server_route_back=False)
        for gw in (pair.cgw, pair.sgw):
            gw.sysctl("net.ipv4.conf.all.promote_secondaries", 1)
        pair.server.popen(["iperf3", "-s", "-p", "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gws = RunningGateways(pair).start()
        try:
            def rto_total():
                return timeouts(pair.client) + timeouts(pair.server)

            mark = rto_total()
            progress("one iperf3 stream; the client gateway's address is replaced 1.5 s in")
            one = streams(pair, 1, pair.cgw_sal, "198.19.2.11", work / "one.pcap")
            rtos_one, mark = rto_total() - mark, rto_total()
            progress("100 parallel streams, no move (the baseline)")
            streams(pair, 100, "198.19.2.11", None, work / "base.pcap")
            rtos_base, mark = rto_total() - mark, rto_total()
            progress("100 parallel streams; the address is replaced again")
            many = streams(pair, 100, "198.19.2.11", "198.19.2.21", work / "many.pcap")
            rtos_many = rto_total() - mark
            stats = gws.stats("client")
            for role in ("client", "server"):
                st = gws.stats(role)
                progress(f"{role} gateway: " + ", ".join(f"{k}={v}" for k, v in sorted(st.items())
                                                      if k.startswith(("packets_", "dropped_", "inject", "kernel_",
                                                                       "holds_", "migrations_", "peer_mig"))))
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
        {"metric": "legacy_tcp_timeouts_during_migration", "value": rtos_one, "unit": "timeouts",
         "baseline": None, "ratio": None},
        {"metric": "legacy_tcp_timeouts_100_streams_moving", "value": rtos_many, "unit": "timeouts",
         "baseline": "legacy_tcp_timeouts_100_streams_no_move", "ratio": None},
        {"metric": "legacy_tcp_timeouts_100_streams_no_move", "value": rtos_base, "unit": "timeouts",
         "baseline": None, "ratio": None},
        {"metric": "migration_confirm_ms_p50", "value": stats.get("migration_ms_p50"), "unit": "ms",
         "baseline": None, "ratio": None},
    ]


def main() -> int:
    return run_part(run, "serval-bench-mob-", 40)


if __name__ == "__main__":
    sys.exit(main())
