"""NAT rebinding: the client gateway behind a masquerading router (UDP carriage) whose
mappings are flushed mid-transfer (a home router rebooting, a carrier NAT forgetting),
with random ports so that each flush gives a new one. Beside direct TCP through the
same NAT, in the same test. And an idle connection whose server speaks next: only the
client gateway's keepalive brings the new mapping to the server gateway."""
import subprocess
import sys
import time

import pytest

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from tests.integration.helpers import make_file, sha256_file, start_http, wait_port

MB = 1024 * 1024

TICKER_PY = r'''
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4)
c, _ = s.accept()
n = 0
while True:                      # the server speaks, once a second, unasked (an SSH session's output)
    c.sendall(b"tick %d\n" % n); n += 1
    time.sleep(1)
'''

READER_PY = r'''
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
f = s.makefile()
while line := f.readline():
    print(line.strip(), flush=True)
'''


def build(lab, tmp_path, client_extra="", http=True):
    www = tmp_path / "www"
    www.mkdir()
    pair = gateway_pair(lab, wire=True, middle=True)
    # the middle router masquerades everything it sends toward the server gateway, on a
    # random port per mapping
    pair.mid.run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", pair.mid_sgw_if, "-j", "MASQUERADE",
                  "--random-fully"])
    gws = RunningGateways(pair, carriage="udp", client_extra=client_extra)
    if http:
        start_http(pair.server, www)
    return pair, gws, www


def flush(pair):
    pair.mid.run(["conntrack", "-F"], check=False)


def download_with_flushes(pair, url, src, out, flushes=2):
    dl = pair.client.popen(["curl", "-sS", "--fail", "-m", "90", "--limit-rate", "4M", "-o", str(out), url],
                           stderr=subprocess.PIPE, text=True)
    size = src.stat().st_size
    for i in range(1, flushes + 1):
        deadline = time.monotonic() + 60
        while not (out.exists() and out.stat().st_size >= size * i // (flushes + 1)):
            if dl.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        flush(pair)
    _, err = dl.communicate(timeout=120)
    return dl.returncode == 0 and sha256_file(out) == sha256_file(src), err


def test_flows_follow_a_rebinding_nat_that_direct_tcp_cannot(lab, tmp_path):
    # (a download's client has nothing to send once its mapping is gone: the keepalive
    # makes the new one if no ACK happens to be on its way)
    pair, gws, www = build(lab, tmp_path, client_extra="[timeouts]\nkeepalive = 2\n")
    src = make_file(www, "20MB.bin", 20 * MB)
    direct_ok, direct_err = download_with_flushes(pair, f"http://{pair.server_addr}:8080/20MB.bin", src,
                                                  tmp_path / "direct.bin")
    gws.start()
    try:
        ok, err = download_with_flushes(pair, f"http://{VIRTUAL_ADDR}/20MB.bin", src, tmp_path / "through.bin")
        assert ok, f"through the gateways: {err} (direct TCP: {'survived' if direct_ok else direct_err})"
        stats = gws.stats("server")
        assert stats.get("nat_rebindings_followed", 0) >= 1, stats
        print(f"direct TCP through the same NAT: {'survived' if direct_ok else 'died: ' + direct_err.strip()}")
    finally:
        assert gws.stop() == {"client": 0, "server": 0}


@pytest.mark.parametrize("keepalive", [1])
def test_an_idle_flow_whose_server_speaks_next_survives_a_flush(lab, tmp_path, keepalive):
    pair, gws, www = build(lab, tmp_path, client_extra=f"[timeouts]\nkeepalive = {keepalive}\n", http=False)
    gws.start()
    try:
        pair.server.popen([sys.executable, "-c", TICKER_PY, "8080"])
        wait_port(pair.server, pair.server_addr, 8080)
        reader = pair.client.popen([sys.executable, "-u", "-c", READER_PY, VIRTUAL_ADDR, "80"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = reader.stdout.readline().strip()
        assert first == "tick 0", reader.stderr.read() if reader.poll() is not None else first
        flush(pair)
        # the next ticks go to a mapping the NAT no longer has, until the client
        # gateway's keepalive makes a new one and the server gateway follows it
        got = [reader.stdout.readline().strip() for _ in range(5)]
        assert got == [f"tick {n}" for n in range(1, 6)], reader.stderr.read() if reader.poll() else got
        stats = gws.stats("server")
        assert stats.get("nat_rebindings_followed", 0) == 1, stats
        assert gws.stats("client").get("keepalives_sent", 0) >= 1
        reader.kill()
    finally:
        assert gws.stop() == {"client": 0, "server": 0}
