"""Path MTU in real namespaces: a router between the gateways whose far link is smaller
(a PPPoE line, a tunnel), with the default config (``mtu = "auto"``) and with
``mtu = 1500`` (so every large packet meets the small link and only ICMP can save the
flow); each beside direct TCP over the same path, in the same test. And forged ICMP
from another address during a transfer, which must change nothing."""
import subprocess
import sys

import pytest

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from tests.integration.helpers import make_file, sha256_file, start_http, start_py_server
from tests.integration.test_fastpath import UPLOAD_PY, wait_for

MB = 1024 * 1024

FORGE_PY = r'''
import socket, struct, sys
from sal import icmp
from sal.ip import aton
src, dst, quoted_src, quoted_dst, proto = sys.argv[1:6]
ids = [int(x, 16) for x in sys.argv[6:8]]
quoted = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1500, 0, 0x4000, 63, int(proto), 0,
                     aton(quoted_src), aton(quoted_dst))
if proto == "17":
    quoted += struct.pack("!HHHH", 54324, 54325, 1480, 0)
quoted += struct.pack("!IIBBH", ids[0], ids[1], 3, 6, 0) + bytes(20)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for code, mtu in ((icmp.FRAG_NEEDED, 576), (icmp.HOST_UNREACH, 0), (icmp.PORT_UNREACH, 0)):
    for _ in range(5):
        s.sendto(icmp.build_error(aton(src), aton(dst), icmp.DEST_UNREACH, code, quoted, mtu), (dst, 0))
'''

BOTH_WAYS_PY = r'''
import hashlib, socket, sys, threading
path, addr = sys.argv[1], sys.argv[2]
down = socket.create_connection((addr, 80), timeout=60)
up = socket.create_connection((addr, 81), timeout=60)
answer = []
def push():
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            up.sendall(chunk)
    up.shutdown(socket.SHUT_WR)
    answer.append(up.recv(200).decode())
t = threading.Thread(target=push)
t.start()
down.sendall(f"GET /50MB.bin HTTP/1.0\r\nHost: {addr}\r\n\r\n".encode())
data = b""
while chunk := down.recv(1 << 20):
    data += chunk
t.join()
print(hashlib.sha256(data.split(b"\r\n\r\n", 1)[1]).hexdigest())
print(answer[0])
'''


def build(lab, tmp_path, carriage, middle_mtu, mtu=None):
    www = tmp_path / "www"
    www.mkdir()
    pair = gateway_pair(lab, wire=True, middle=True, middle_mtu=middle_mtu)
    gws = RunningGateways(pair, carriage=carriage,
                          extra_services=[("up.svc.example", 81, VIRTUAL_ADDR, 9000)])
    if mtu is not None:
        for path in gws.configs.values():
            path.write_text(path.read_text().replace("[gateway]\n", f"[gateway]\nmtu = {mtu}\n", 1))
    start_http(pair.server, www)
    start_py_server(pair.server, "halfclose", 9000)
    return pair, gws, www


def download(pair, url, out, timeout=120):
    r = pair.client.run(["curl", "-sS", "--fail", "-m", str(timeout), "-o", str(out), url],
                        check=False, timeout=timeout + 10)
    return r.returncode, r.stderr


def upload(pair, path, addr, port):
    r = pair.client.run([sys.executable, "-c", UPLOAD_PY, str(path), addr, str(port)], check=False, timeout=120)
    return r.stdout.split()


@pytest.mark.parametrize("carriage", ["ip", "udp"])
@pytest.mark.parametrize("middle_mtu", [1492, 1400, 1280])
def test_a_smaller_middle_link_carries_50mb_both_ways(lab, tmp_path, carriage, middle_mtu):
    pair, gws, www = build(lab, tmp_path, carriage, middle_mtu)
    src = make_file(www, "50MB.bin", 50 * MB)
    up = make_file(tmp_path, "up.bin", 20 * MB)
    # direct TCP over the same path first: plain routing through the same namespaces
    out = tmp_path / "direct.bin"
    assert download(pair, f"http://{pair.server_addr}:8080/50MB.bin", out) == (0, "")
    assert sha256_file(out) == sha256_file(src)
    assert upload(pair, up, pair.server_addr, 9000) == [str(20 * MB), sha256_file(up)]
    # through the gateways, default config (mtu = "auto")
    gws.start()
    try:
        out = tmp_path / "through.bin"
        assert download(pair, f"http://{VIRTUAL_ADDR}/50MB.bin", out) == (0, "")
        assert sha256_file(out) == sha256_file(src)
        assert upload(pair, up, VIRTUAL_ADDR, 81) == [str(20 * MB), sha256_file(up)]
        assert gws.stats("server").get("internal_errors", 0) == 0
    finally:
        assert gws.stop() == {"client": 0, "server": 0}


@pytest.mark.parametrize("carriage", ["ip", "udp"])
@pytest.mark.parametrize("middle_mtu", [1400, 1280])
def test_icmp_teaches_the_legacy_hosts_when_the_config_says_1500(lab, tmp_path, carriage, middle_mtu):
    """``mtu = 1500``: the client gateway's large packets die at the router (its ICMP
    comes back), the server gateway's at its own link (its own kernel's ICMP); both
    are translated to the legacy senders, whose PMTU discovery does the rest."""
    pair, gws, www = build(lab, tmp_path, carriage, middle_mtu, mtu=1500)
    src = make_file(www, "50MB.bin", 50 * MB)
    up = make_file(tmp_path, "up.bin", 20 * MB)
    out = tmp_path / "direct.bin"
    assert download(pair, f"http://{pair.server_addr}:8080/50MB.bin", out) == (0, "")
    assert sha256_file(out) == sha256_file(src)
    gws.start()
    try:
        # both connections open before either sends, so that neither starts with a
        # path MTU the other one's ICMP taught
        r = pair.client.run([sys.executable, "-c", BOTH_WAYS_PY, str(up), VIRTUAL_ADDR], timeout=150)
        down_sha, up_answer = r.stdout.splitlines()
        assert down_sha == sha256_file(src)
        assert up_answer.split() == [str(20 * MB), sha256_file(up)]
        client, server = gws.stats("client"), gws.stats("server")
        # the router's ICMP, about the upload; the server gateway's own kernel's, about the download
        assert client.get("icmp_frag_needed_sent", 0) > 0, sorted(client.items())
        assert server.get("icmp_frag_needed_sent", 0) > 0, sorted(server.items())
        # a new flow starts at the path MTU learnt: no ICMP needed any more
        sent = server["icmp_frag_needed_sent"]
        assert download(pair, f"http://{VIRTUAL_ADDR}/50MB.bin", out) == (0, "")
        assert sha256_file(out) == sha256_file(src)
        assert gws.stats("server")["icmp_frag_needed_sent"] == sent
    finally:
        assert gws.stop() == {"client": 0, "server": 0}


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_forged_icmp_from_another_address_changes_nothing(lab, tmp_path, carriage):
    pair, gws, www = build(lab, tmp_path, carriage, 1500)
    src = make_file(www, "30MB.bin", 30 * MB)
    gws.start()
    try:
        out = tmp_path / "got.bin"
        dl = pair.client.popen(["curl", "-sS", "--fail", "-m", "120", "--limit-rate", "10M", "-o", str(out),
                                f"http://{VIRTUAL_ADDR}/30MB.bin"], stderr=subprocess.PIPE, text=True)
        wait_for("the download's flow", lambda: [f for f in gws.ctl("client", "flows")
                                                 if f["state"] == "established"])
        [row] = [f for f in gws.ctl("client", "flows") if f["state"] == "established"]
        proto = "144" if carriage == "ip" else "17"
        # from the middle router's far side, an address that is nobody on the path:
        # right addresses with guessed flowIDs, and the flow's own flowIDs quoted as
        # sent to another peer
        for quoted_dst, ids in ((pair.sgw_sal, ["12345678", "9abcdef0"]),
                                ("198.19.5.77", [row["local_flow"], row["remote_flow"]])):
            pair.mid.run([sys.executable, "-c", FORGE_PY, "198.19.5.254", pair.cgw_sal, pair.cgw_sal,
                          quoted_dst, proto, *ids], cwd=str(tmp_path), env=_repo_env())
        _, err = dl.communicate(timeout=150)
        assert dl.returncode == 0, err
        assert sha256_file(out) == sha256_file(src)
        stats = gws.stats("client")
        assert stats.get("icmp_frag_needed", 0) == 0 and stats.get("icmp_frag_needed_sent", 0) == 0
        assert stats.get("icmp_refused_handshake", 0) == 0
        assert stats.get("dropped_icmp_unverified", 0) + stats.get("dropped_icmp_no_flow", 0) == 30
    finally:
        assert gws.stop() == {"client": 0, "server": 0}


def _repo_env():
    import os
    from lab.gateways import REPO
    return {**os.environ, "PYTHONPATH": str(REPO)}
