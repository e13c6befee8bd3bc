"""``make demo``: the gateway pair in a lab of network namespaces, step by step.

    client ── cgw (client gateway) ══ SAL ══ sgw (server gateway) ── server

An unmodified curl on the client fetches a page and a 10 MB file from an unmodified
Python http.server on the server, by a virtual address that stands for a serviceID.
The packets between the gateways are captured and decoded; everything is torn down.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.gateways import SERVICE, VIRTUAL_ADDR, REPO, RunningGateways
from lab.topologies import gateway_pair
from lab.topology import Lab


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"\n==> {text}")


def show(result: subprocess.CompletedProcess, limit: int = 40) -> None:
    lines = (result.stdout or "").rstrip().splitlines()
    for line in lines[:limit]:
        say(f"    {line}")
    if len(lines) > limit:
        say(f"    … ({len(lines) - limit} more lines)")
    if result.returncode:
        say(f"    (exit {result.returncode}) {result.stderr.strip()}")


def main() -> int:
    www = Path(tempfile.mkdtemp(prefix="serval-demo-"))
    (www / "index.html").write_text("<h1>Hello from an unmodified server</h1>\n")
    blob = os.urandom(10 * 1024 * 1024)
    (www / "10MB.bin").write_bytes(blob)
    ok = True
    with Lab() as lab:
        step("building the lab: four network namespaces joined by veth pairs")
        # wire-like legacy links: the hosts segment and checksum their own TCP as behind a
        # NIC (a veth would hand on partial checksums, shown as "bad" in the capture), so
        # the kernel fast path carries the established flows
        pair = gateway_pair(lab, server_route_back=False, wire=True)
        for host, addr in ((pair.client, pair.client_addr), (pair.cgw, f"{pair.cgw_lan} | {pair.cgw_sal}"),
                           (pair.sgw, f"{pair.sgw_sal} | {pair.sgw_lan}"), (pair.server, pair.server_addr)):
            say(f"    {host.ns:16} {addr}")
        say("    (the server has no route beyond its own subnet: it is not changed at all)")

        step("starting an unmodified web server on the server host (python -m http.server 8080)")
        pair.server.popen([sys.executable, "-m", "http.server", "8080", "-d", str(www)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        step("starting the gateways (serval gateway client / server)")
        gws = RunningGateways(pair)
        say(f"    client config: {gws.configs['client']}")
        say(f"    server config: {gws.configs['server']}")
        gws.start()
        for line in gws.log("client").splitlines() + gws.log("server").splitlines():
            say(f"    {line.split(': ', 1)[-1]}")

        pcap = www / "sal.pcap"
        dump = pair.cgw.popen(["tcpdump", "-U", "-s", "0", "-ni", pair.cgw_sal_if, "-w", str(pcap)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        try:
            step(f"curl http://{VIRTUAL_ADDR}/ on the client ({SERVICE}:80 has virtual address {VIRTUAL_ADDR})")
            r = pair.client.run(["curl", "-sS", "-m", "10", f"http://{VIRTUAL_ADDR}/"], check=False)
            show(r)
            ok &= r.returncode == 0

            step("downloading 10 MB through both gateways, SHA-256 checked at both ends")
            r = pair.client.run(["sh", "-c", f"curl -sS -m 60 -w '%{{size_download}} bytes in %{{time_total}} s\\n' "
                                 f"-o /tmp/serval-demo-10MB.bin http://{VIRTUAL_ADDR}/10MB.bin && "
                                 "sha256sum /tmp/serval-demo-10MB.bin && rm -f /tmp/serval-demo-10MB.bin"],
                                check=False, timeout=90)
            show(r)
            expected = hashlib.sha256(blob).hexdigest()
            same = expected in r.stdout
            say(f"    server side sha256 {expected}: {'identical' if same else 'DIFFERENT'}")
            ok &= r.returncode == 0 and same

            step("a connection held open, as `serval ctl flows` shows it on the client gateway")
            holder = pair.client.popen(["curl", "-sS", "--limit-rate", "200k", "-o", "/dev/null",
                                        f"http://{VIRTUAL_ADDR}/10MB.bin"])
            time.sleep(1.0)
            show(pair.cgw.run([sys.executable, "-m", "serval", "ctl", "-s", gws.sockets["client"], "flows"],
                              check=False, cwd=str(REPO)))
            holder.kill()

            step("counters (serval ctl stats) on the server gateway")
            show(pair.sgw.run([sys.executable, "-m", "serval", "ctl", "-s", gws.sockets["server"], "stats"],
                              check=False, cwd=str(REPO)))
        finally:
            time.sleep(0.5)
            dump.terminate()
            dump.wait(5)
            step("stopping the gateways (SIGTERM): rules, routes and sysctls are restored")
            codes = gws.stop()
            say(f"    exit codes: {codes}")
            ok &= codes == {"client": 0, "server": 0}

        step("the SAL packets on the wire between the gateways (serval decode, first handshake)")
        r = subprocess.run([sys.executable, "-m", "serval", "decode", str(pcap)], capture_output=True,
                           text=True, cwd=REPO)
        lines = r.stdout.splitlines()
        for line in [x for x in lines if " ip " in x or " udp " in x][:6]:
            say(f"    {line}")
        say("    …")
        say(f"    {lines[-1] if lines else r.stderr.strip()}")
        step("tearing the lab down")
    say(f"\ndemo {'finished: everything worked' if ok else 'FAILED: see above'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
