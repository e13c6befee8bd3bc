"""A flood at both gateways during a transfer: spoofed SYNs from the LAN side, random
SAL packets from the SAL side. Nothing established suffers, new connections still work."""
import subprocess
import sys
import time
from pathlib import Path

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from tests.integration.helpers import make_file, ruleset, sha256_file, start_http

# what a gateway may grow to while it holds its caps' worth of spoofed handshakes:
# the Python process starts near 45 MB; 4096 half-open flows are a few MB more
RSS_BOUND_MB = 150

FLOOD = r'''
import os, random, socket, struct, sys, time
kind, target, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
random.seed(11)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b)); t = (t & 0xffff) + (t >> 16); t = (t & 0xffff) + (t >> 16)
    return ~t & 0xffff
dst = socket.inet_aton(target)
sent, t0 = 0, time.monotonic()
for i in range(count):
    src = socket.inet_aton("198.19.%d.%d" % (random.randint(100, 199), random.randint(1, 254)))
    if kind == "syn":
        tcp = struct.pack("!HHIIBBHHH", random.randint(1024, 65535), 80, random.getrandbits(32), 0, 0x50, 2, 65535, 0, 0)
        c = csum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
        body, proto = tcp[:16] + struct.pack("!H", c) + tcp[18:], 6
    else:
        body, proto = os.urandom(random.randint(12, 80)), 144
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, proto, 0, src, dst)
    s.sendto(ip + body, (target, 0)); sent += 1
print(sent, round(time.monotonic() - t0, 2))
'''


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_flood_during_a_50mb_transfer(lab, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("still here\n")
    src = make_file(www, "50MB.bin", 50 * 1024 * 1024)
    pair = gateway_pair(lab, server_route_back=False)
    before = {h.name: ruleset(h) for h in (pair.cgw, pair.sgw)}
    gws = RunningGateways(pair).start()
    start_http(pair.server, www)
    out = tmp_path / "got.bin"
    dl = pair.client.popen(["curl", "-sS", "--fail", "-m", "120", "--limit-rate", "15M", "-o", str(out),
                            f"http://{VIRTUAL_ADDR}/50MB.bin"], stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    floods = [pair.client.popen([sys.executable, "-c", FLOOD, "syn", VIRTUAL_ADDR, "20000"],
                                stdout=subprocess.PIPE, text=True),
              pair.cgw.popen([sys.executable, "-c", FLOOD, "sal", pair.sgw_sal, "20000"],
                             stdout=subprocess.PIPE, text=True)]
    time.sleep(0.3)
    # a legitimate new connection during the flood
    r = pair.client.run(["curl", "-sS", "--fail", "-m", "30", f"http://{VIRTUAL_ADDR}/index.html"],
                        check=False, timeout=40)
    if r.returncode:
        print("CLIENT", gws.stats("client"), "\nSERVER", gws.stats("server"))
    assert r.returncode == 0 and r.stdout == "still here\n", r.stderr
    for f in floods:
        f.wait(60)
    peak = {role: rss_mb(proc.pid) for role, proc in gws.procs.items()}
    _, err = dl.communicate(timeout=120)
    assert dl.returncode == 0, err
    assert sha256_file(out) == sha256_file(src)
    client, server = gws.stats("client"), gws.stats("server")
    assert client.get("internal_errors", 0) == 0 and server.get("internal_errors", 0) == 0
    assert client["flows_opened"] > 1000                   # the spoofed SYNs did reach it
    assert server.get("malformed", 0) + sum(v for k, v in server.items() if k.startswith("dropped_")) > 1000
    assert all(mb < RSS_BOUND_MB for mb in peak.values()), peak
    print(f"gateway RSS after the flood: {peak}; half-open evicted: client "
          f"{client.get('limit_half_open_evicted', 0)}, server {server.get('limit_half_open_evicted', 0)}")
    assert gws.stop() == {"client": 0, "server": 0}
    for h in (pair.cgw, pair.sgw):
        assert ruleset(h) == before[h.name]
