"""The quick pair demo (``make demo STEP=pair``): one static gateway pair, no router.

    client ── cgw (client gateway) ══ SAL ══ sgw (server gateway) ── server

An unmodified curl on the client fetches a page and a 10 MB file from an unmodified
Python http.server on the server, by a virtual address that stands for a serviceID.
The packets between the gateways are captured and decoded.
"""
from __future__ import annotations

import hashlib
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.demo_report import Shown, StepFailed, check, note, ruleset, show, wait_until
from lab.gateways import REPO, SERVICE, VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from lab.topology import Lab

TITLE = "a static gateway pair: a page and 10 MB by virtual address, the SAL on the wire"
SHOWN_STATS = ("handshakes_completed", "flows_opened", "fastpath", "fastpath_to_sal", "fastpath_from_sal",
               "to_sal", "from_sal", "mss_clamped")


def wait_for_line(stream, text: str, timeout: float) -> None:
    """Read ``stream`` (a pipe) until a line containing ``text``."""
    deadline = time.monotonic() + timeout
    seen = b""
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            raise StepFailed(f"timed out after {timeout:g} s waiting for {text!r}")
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            raise StepFailed(f"the program ended before saying {text!r}: {seen.decode(errors='replace')}")
        seen += chunk


def run(ctx) -> Shown:
    www = Path(tempfile.mkdtemp(prefix="serval-demo-pair-"))
    ctx.cleanup_paths.append(www)
    (www / "index.html").write_text("<h1>Hello from an unmodified server</h1>\n")
    blob = os.urandom(10 * 1024 * 1024)
    (www / "10MB.bin").write_bytes(blob)
    with Lab() as lab:
        ctx.track(lab)
        # wire-like legacy links: the hosts segment and checksum their own TCP as behind a
        # NIC (a veth would hand on partial checksums, shown as "bad" in the capture), so
        # the kernel fast path carries the established flows
        pair = gateway_pair(lab, server_route_back=False, wire=True)
        ctx.track(lab)
        note("four namespaces joined by veth pairs:")
        for host, addr in ((pair.client, pair.client_addr), (pair.cgw, f"{pair.cgw_lan} | {pair.cgw_sal}"),
                           (pair.sgw, f"{pair.sgw_sal} | {pair.sgw_lan}"), (pair.server, pair.server_addr)):
            note(f"  {host.ns:16} {addr}")
        note("(the server has no route beyond its own subnet: it is not changed at all)")
        server = pair.server.popen([sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0",
                                    "-d", str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: server.poll() is not None or pair.server.run(
            ["ss", "-ltnH", "sport = :8080"], check=False).stdout.strip(), "the web server to listen", 30)
        check(server.poll() is None, "the web server on the server host did not start")

        before = {h.name: ruleset(h) for h in (pair.cgw, pair.sgw)}
        gws = RunningGateways(pair)
        ctx.cleanup_paths.append(gws.dir)
        gws.start(timeout=60)
        for role in ("client", "server"):
            for line in gws.log(role).splitlines():
                if " gateway up:" in line or "service " in line or "fast path on" in line:
                    note(f"  {role} gateway: {line.split(': ', 1)[-1]}")

        pcap = www / "sal.pcap"
        dump = pair.cgw.popen(["tcpdump", "-U", "-s", "0", "-ni", pair.cgw_sal_if, "-w", str(pcap)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_line(dump.stderr, "listening on", 30)
            note(f"\n$ curl http://{VIRTUAL_ADDR}/      (on the client; {VIRTUAL_ADDR}:80 is {SERVICE}:80 "
                 "in the client gateway's config)")
            r = pair.client.run(["curl", "-sS", "-m", "30", f"http://{VIRTUAL_ADDR}/"], check=False, timeout=60)
            show(r)
            check(r.returncode == 0 and "Hello" in r.stdout, f"curl by virtual address failed: {r.stderr.strip()}")

            note("\n10 MB through both gateways, SHA-256 checked at both ends")
            out = f"/tmp/{lab.prefix}-10MB.bin"
            ctx.cleanup_paths.append(Path(out))
            r = pair.client.run(["sh", "-c", f"curl -sS -m 120 -w '%{{size_download}} bytes in %{{time_total}} s\\n' "
                                 f"-o {out} http://{VIRTUAL_ADDR}/10MB.bin && sha256sum {out} && rm -f {out}"],
                                check=False, timeout=150)
            show(r)
            expected = hashlib.sha256(blob).hexdigest()
            note(f"server side sha256 {expected}: {'identical' if expected in r.stdout else 'DIFFERENT'}")
            check(r.returncode == 0, f"the 10 MB download failed: {r.stderr.strip()}")
            check(expected in r.stdout, "the 10 MB file arrived with another SHA-256")
            took = re.search(r"in ([\d.]+) s", r.stdout)

            note("\na connection held open, as `serval ctl flows` shows it on the client gateway")
            holder = pair.client.popen(["curl", "-sS", "--limit-rate", "200k", "-o", "/dev/null",
                                        f"http://{VIRTUAL_ADDR}/10MB.bin"])
            wait_until(lambda: any(f["state"] == "established" and f["bytes_in"] for f in gws.ctl("client", "flows")),
                       "the held connection to carry data", 30)
            show(pair.cgw.run([sys.executable, "-m", "serval", "ctl", "-s", gws.sockets["client"], "flows"],
                              check=False, cwd=str(REPO)))
            holder.kill()
            holder.wait()
            note("\ncounters on the server gateway (serval ctl stats, a few of them)")
            stats = gws.stats("server")
            for key in SHOWN_STATS:
                if key in stats:
                    note(f"  {key:24} {stats[key]}")
        finally:
            codes = gws.stop()
            dump.terminate()
            dump.wait(10)
        note(f"\ngateways stopped (SIGTERM): exit codes {codes}")
        check(codes == {"client": 0, "server": 0}, f"a gateway did not stop cleanly: {codes}")
        for h in (pair.cgw, pair.sgw):
            check(ruleset(h) == before[h.name], f"{h.name}: the gateway left firewall rules behind")
        note("their firewall rules are gone: iptables-save is as before they started")

    note("\nthe SAL packets between the gateways (serval decode, the first handshake)")
    r = subprocess.run([sys.executable, "-m", "serval", "decode", str(pcap)], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    lines = r.stdout.splitlines()
    for line in [x for x in lines if " ip " in x or " udp " in x][:4]:
        note(f"  {line}")
    note("  …")
    last = lines[-1] if lines else r.stderr.strip()
    note(f"  {last}")
    counts = dict(re.findall(r"(\w+)=(\d+)", last))
    check(r.returncode == 0 and counts.get("packets"), f"serval decode failed: {r.stderr.strip()[-300:]}")
    check(counts.get("malformed") == "0" and counts.get("sal_checksum_ok") == counts["packets"]
          and counts.get("transport_checksum_ok") == counts["packets"],
          f"the capture has packets with bad checksums or malformed: {last}")
    return Shown(
        f"10 MB in {float(took.group(1)) if took else 0:.2f} s, SHA-256 equal; "
        f"{counts['packets']} SAL packets, all checksums ok",
        [("server", "python3 -m http.server 8080"),
         ("server gateway", "serval gateway server --config server.toml  # [[service]] backend 198.19.3.2:8080"),
         ("client gateway", "serval gateway client --config client.toml  # [[service]] 198.18.0.10, [[route]]"),
         ("client", f"curl http://{VIRTUAL_ADDR}/"),
         ("client gateway", "tcpdump -U -w sal.pcap -i eth1 &  ...  serval decode sal.pcap"),
         ("client gateway", "serval ctl --socket /run/serval/client.sock flows")])
