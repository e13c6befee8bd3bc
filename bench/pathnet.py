"""Paths that are not a clean LAN: ``python -m bench.pathnet``.

``pmtu_goodput_ratio``
    a 50 MB download across a middle router whose far link has MTU 1400, through the
    gateway pair (default config, ``mtu = "auto"``) divided by the same download direct
    (plain routing over the same namespaces), measured in the same lab; and
    ``pmtu_goodput_ratio_icmp``, the same with ``mtu = 1500`` configured, where only the
    translated ICMP "fragmentation needed" lets the legacy hosts fit the path.
``nat_rebinding_survival``
    20 downloads in flight through a middle router that masquerades on random ports
    (UDP carriage, ``[timeouts] keepalive = 2`` on the client gateway); its mappings are
    flushed twice (``conntrack -F``); the fraction of downloads that complete with the
    right bytes. Its baseline, the same 20 direct TCP
    downloads through the same NAT, is ``nat_rebinding_survival_direct``.

Records are merged into ``build/bench.json``.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.records import run_part
from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from lab.topology import Lab

FLOWS = 20


def progress(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def record(metric, value, unit, baseline=None, ratio=None) -> dict:
    return {"metric": metric, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio}


def timed_download(host, url: str, out: Path, digest: str) -> float | None:
    """Seconds to download ``url`` with curl, or None when it failed or came out wrong."""
    start = time.monotonic()
    r = host.run(["curl", "-sS", "--fail", "-m", "120", "-o", str(out), url], check=False, timeout=130)
    took = time.monotonic() - start
    if r.returncode or hashlib.sha256(out.read_bytes()).hexdigest() != digest:
        return None
    return took


def pmtu(work: Path, blob: bytes, digest: str) -> list[dict]:
    records = []
    for mtu, suffix in ((None, ""), (1500, "_icmp")):
        with Lab() as lab:
            progress(f"middle link MTU 1400, gateway mtu {'auto' if mtu is None else mtu} ({lab.prefix}-*)")
            pair = gateway_pair(lab, wire=True, middle=True, middle_mtu=1400)
            www = work / f"www{suffix}"
            www.mkdir()
            (www / "50MB.bin").write_bytes(blob)
            pair.server.popen([sys.executable, "-m", "http.server", "8080", "-d", str(www)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_listening(pair.server, 8080)
            gws = RunningGateways(pair)
            if mtu is not None:
                for path in gws.configs.values():
                    path.write_text(path.read_text().replace("[gateway]\n", f"[gateway]\nmtu = {mtu}\n", 1))
            direct = timed_download(pair.client, f"http://{pair.server_addr}:8080/50MB.bin", work / "d.bin", digest)
            gws.start()
            try:
                through = timed_download(pair.client, f"http://{VIRTUAL_ADDR}/50MB.bin", work / "t.bin", digest)
            finally:
                gws.stop()
            mbps = lambda t: None if t is None else len(blob) * 8 / t / 1e6
            progress(f"direct {mbps(direct)} Mbit/s, through {mbps(through)} Mbit/s")
            ratio = None if direct is None or through is None else direct / through
            records.append(record(f"pmtu_goodput_ratio{suffix}", mbps(through), "Mbit/s",
                                  f"direct over the same path: {mbps(direct) or 'FAILED'} Mbit/s", ratio))
    return records


def nat_rebinding(work: Path) -> list[dict]:
    blob = os.urandom(4 * 1024 * 1024)
    digest = hashlib.sha256(blob).hexdigest()
    www = work / "www_nat"
    www.mkdir()
    (www / "4MB.bin").write_bytes(blob)
    with Lab() as lab:
        progress(f"random-port masquerade, {FLOWS} downloads, two flushes ({lab.prefix}-*)")
        pair = gateway_pair(lab, wire=True, middle=True)
        pair.mid.run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", pair.mid_sgw_if, "-j", "MASQUERADE",
                      "--random-fully"])
        pair.server.popen([sys.executable, "-m", "http.server", "8080", "-d", str(www)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(pair.server, 8080)
        # keepalive as for a NAT path (docs/mobility.md): a download's client, once its
        # mapping is gone, has nothing to send until the server's data arrives again
        gws = RunningGateways(pair, carriage="udp", client_extra="[timeouts]\nkeepalive = 2\n")
        direct = _survivors(pair, work / "direct", f"http://{pair.server_addr}:8080/4MB.bin", digest)
        gws.start()
        try:
            through = _survivors(pair, work / "through", f"http://{VIRTUAL_ADDR}/4MB.bin", digest)
        finally:
            gws.stop()
    progress(f"survived: {through}/{FLOWS} through the gateways, {direct}/{FLOWS} direct")
    return [record("nat_rebinding_survival", through / FLOWS, "fraction",
                   f"direct TCP through the same NAT: {direct / FLOWS:.2f}", None),
            record("nat_rebinding_survival_direct", direct / FLOWS, "fraction")]


def _survivors(pair, folder: Path, url: str, digest: str) -> int:
    """Start FLOWS rate-limited downloads, flush the NAT twice while they run, count
    the ones that finish right."""
    folder.mkdir()
    procs = [pair.client.popen(["curl", "-sS", "--fail", "-m", "90", "--limit-rate", "400K", "-o",
                                str(folder / f"{i}.bin"), url], stderr=subprocess.DEVNULL)
             for i in range(FLOWS)]
    for share in (1, 2):                # after a third and two thirds of the bytes
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _bytes(folder) < FLOWS * 4 * 1024 * 1024 * share // 3:
            time.sleep(0.05)
        pair.mid.run(["conntrack", "-F"], check=False)
    ok = 0
    for i, proc in enumerate(procs):
        proc.wait(90)
        path = folder / f"{i}.bin"
        if proc.returncode == 0 and path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == digest:
            ok += 1
    return ok


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.bin"))


def _wait_listening(host, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not host.run(["ss", "-ltnH", f"sport = :{port}"], check=False).stdout.strip():
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on port {port}")
        time.sleep(0.05)


def run(work: Path) -> list[dict]:
    blob = os.urandom(50 * 1024 * 1024)
    digest = hashlib.sha256(blob).hexdigest()
    return pmtu(work, blob, digest) + nat_rebinding(work)


def main() -> int:
    return run_part(run, "serval-bench-pathnet-")


if __name__ == "__main__":
    sys.exit(main())
