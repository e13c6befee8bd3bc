"""The gateway pair for real: kernel TCP in namespaces, NFQUEUE, unmodified programs.

    client --- cgw (client gateway) === SAL === sgw (server gateway) --- server

The server has no route beyond its own subnet: it needs no change at all.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.gateways import VIRTUAL_ADDR, RunningGateways
from lab.topologies import gateway_pair
from tests.integration.helpers import (make_file, ruleset, sha256_file, start_http,
                                        start_py_server)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def www(tmp_path):
    d = tmp_path / "www"
    d.mkdir()
    (d / "index.html").write_text("hello from an unmodified server\n")
    return d


def build(lab, carriage="ip", client_address="gateway", wire=False, **kw):
    pair = gateway_pair(lab, server_route_back=client_address == "peer", wire=wire)
    before = {h.name: ruleset(h) for h in (pair.cgw, pair.sgw)}
    gws = RunningGateways(pair, carriage=carriage, client_address=client_address, **kw).start()
    return pair, gws, before


def stop_and_check(pair, gws, before):
    codes = gws.stop()
    assert codes == {"client": 0, "server": 0}, (gws.log("client"), gws.log("server"))
    for h in (pair.cgw, pair.sgw):
        assert ruleset(h) == before[h.name], f"{h.name}: rules left behind"


@pytest.fixture(params=["ip", "udp"])
def running(request, lab, www):
    pair, gws, before = build(lab, carriage=request.param)
    start_http(pair.server, www)
    yield pair, gws
    stop_and_check(pair, gws, before)


def wait_stat(gws, role, key, value, timeout=5.0) -> dict:
    """The gateway's counters once ``key`` reaches ``value`` (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = gws.stats(role)
        if stats.get(key, 0) >= value or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def curl(host, url, *args, timeout=30):
    return host.run(["curl", "-sS", "--fail", "-m", str(timeout), *args, url], check=False,
                    timeout=timeout + 10)


def test_curl_from_lan_host_and_from_gateway_host(running):
    pair, gws = running
    r = curl(pair.client, f"http://{VIRTUAL_ADDR}/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from an unmodified server\n"
    r = curl(pair.cgw, f"http://{VIRTUAL_ADDR}/")       # a process on the gateway itself
    assert r.returncode == 0, r.stderr
    stats = gws.stats("client")
    assert stats["flows_established"] == 2 and stats.get("malformed", 0) == 0
    assert gws.stats("server")["flows_opened"] == 2


def test_50mb_transfer_sha256(running, www):
    pair, gws = running
    src = make_file(www, "big.bin", 50 * 1024 * 1024)
    r = pair.client.run(["sh", "-c", f"curl -sS --fail -m 120 http://{VIRTUAL_ADDR}/big.bin | sha256sum"],
                        check=False, timeout=150)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == sha256_file(src)


def test_200_concurrent_connections(running):
    pair, gws = running
    urls = [f"http://{VIRTUAL_ADDR}/index.html?{i}" for i in range(200)]
    r = pair.client.run(["curl", "-sS", "-Z", "--parallel-max", "200", "-m", "60",
                         "-w", "%{http_code}\\n", "-o", "/dev/null", *[x for u in urls for x in ("-o", "/dev/null", u)]],
                        check=False, timeout=90)
    codes = [line for line in r.stdout.split() if line.isdigit()]
    assert codes.count("200") == 200, (r.stdout[-500:], r.stderr[-500:])
    assert gws.stats("server")["flows_opened"] == 200


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 is not installed")
def test_iperf3_both_directions(lab):
    pair, gws, before = build(lab)
    pair.server.popen(["iperf3", "-s", "-p", "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    for extra in ([], ["-R"]):
        r = pair.client.run(["iperf3", "-c", VIRTUAL_ADDR, "-p", "80", "-t", "2", "-J", *extra],
                            check=False, timeout=60)
        assert r.returncode == 0, r.stdout[-800:] + r.stderr
        result = json.loads(r.stdout)
        received = result["end"]["sum_received"]["bytes"]
        assert received > 1_000_000, f"only {received} bytes with {extra}"
    stop_and_check(pair, gws, before)


def test_half_close(lab):
    pair, gws, before = build(lab)
    start_py_server(pair.server, "halfclose", 8080)
    client_code = (
        "import socket,hashlib,sys\n"
        f"s=socket.create_connection(('{VIRTUAL_ADDR}',80),timeout=20)\n"
        "data=b'serval'*200000\n"
        "s.sendall(data); s.shutdown(socket.SHUT_WR)\n"
        "reply=b''\n"
        "while c:=s.recv(4096): reply+=c\n"
        "print(reply.decode()); print(len(data), hashlib.sha256(data).hexdigest())\n")
    r = pair.client.run([sys.executable, "-c", client_code], check=False, timeout=40)
    assert r.returncode == 0, r.stderr
    got, expected = r.stdout.strip().splitlines()
    assert got == expected
    # both directions closed: SAL FIN exchanged each way, flows closed at both gateways
    for role in ("client", "server"):
        stats = wait_stat(gws, role, "flows_closed", 1)
        assert stats.get("flows_closed") == 1, (role, stats)
    stop_and_check(pair, gws, before)


def test_reset_from_server(lab):
    pair, gws, before = build(lab)
    start_py_server(pair.server, "reset", 8080)
    code = (f"import socket\ns=socket.create_connection(('{VIRTUAL_ADDR}',80),timeout=10)\n"
            "s.sendall(b'hi')\n"
            "try:\n  print(repr(s.recv(10)))\nexcept ConnectionResetError:\n  print('reset')\n")
    r = pair.client.run([sys.executable, "-c", code], check=False, timeout=20)
    assert r.stdout.strip() == "reset", r.stdout + r.stderr
    for role in ("client", "server"):
        stats = wait_stat(gws, role, "flows_reset", 1)
        assert stats.get("flows_reset") == 1, (role, stats)
    stop_and_check(pair, gws, before)


def test_client_aborts_mid_transfer(lab):
    pair, gws, before = build(lab)
    server = start_py_server(pair.server, "stream", 8080)
    code = (f"import socket,struct\ns=socket.create_connection(('{VIRTUAL_ADDR}',80),timeout=10)\n"
            "n=0\n"
            "while n < 2_000_000: n += len(s.recv(65536))\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii',1,0))\n"
            "s.close(); print(n)\n")
    r = pair.client.run([sys.executable, "-c", code], check=False, timeout=30)
    assert r.returncode == 0 and int(r.stdout) >= 2_000_000, r.stderr
    deadline = time.time() + 10
    line = ""
    while time.time() < deadline and "peer gone" not in line:
        line = server.stdout.readline()
    assert "peer gone" in line          # the server learnt of the abort
    stats = wait_stat(gws, "server", "flows_reset", 1)
    assert stats.get("flows_reset") == 1, stats
    # and the gateways serve the next connection
    r = pair.client.run([sys.executable, "-c", code], check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    stop_and_check(pair, gws, before)


@pytest.mark.parametrize("fast_path", ["on", "off"])
@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_capture_between_gateways_decodes(lab, www, tmp_path, carriage, fast_path):
    # wire-like legacy links: a veth hands on partial checksums (filled in by a NIC at
    # transmit, never on a veth), which a capture would show as they are
    pair, gws, before = build(lab, carriage=carriage, wire=True, fast_path=fast_path)
    start_http(pair.server, www)
    pcap = tmp_path / "sal.pcap"
    dump = pair.cgw.popen(["tcpdump", "-U", "-s", "0", "-ni", pair.cgw_sal_if, "-w", str(pcap)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    make_file(www, "mid.bin", 300_000)
    r = curl(pair.client, f"http://{VIRTUAL_ADDR}/mid.bin", "-o", "/dev/null")
    assert r.returncode == 0, r.stderr
    time.sleep(1.0)
    dump.terminate()
    dump.wait(5)
    out = subprocess.run([sys.executable, "-m", "serval", "decode", str(pcap)], capture_output=True,
                         text=True, cwd=REPO)
    lines = out.stdout.strip().splitlines()
    summary = dict(kv.split("=") for kv in lines[-1].split())
    n = int(summary["packets"])
    assert n > 200, lines[-5:]
    assert summary["malformed"] == "0"
    assert int(summary["sal_checksum_ok"]) == n and int(summary["transport_checksum_ok"]) == n
    # what the reference puts on the wire: IP protocol 144 (or UDP 54324/54325), ports 0
    from sal import pcap as pcapmod, wire
    from sal.ip import IPv4
    flags = []
    for _, pkt in pcapmod.read_pcap(pcap.read_bytes()):
        if pkt is None:
            continue
        ip = IPv4(pkt)
        if carriage == "ip":
            assert ip.protocol == 144
            body = pkt[ip.ihl:ip.total_length]
        else:
            assert ip.protocol == 17 and {pkt[20:22], pkt[22:24]} == {(54324).to_bytes(2, "big"), (54325).to_bytes(2, "big")}
            body = pkt[ip.ihl + 8:ip.total_length]
        hdr, off = wire.decode(body)
        if len(body) > off:
            assert body[off:off + 4] == b"\0\0\0\0"
        if hdr.control:
            flags.append(wire.flag_names(hdr.flags))
    assert flags[:3] == ["SYN", "SYN|ACK", "ACK"], flags
    assert flags.count("FIN") == 2
    stats = gws.stats("client")
    if fast_path == "on":               # the data went through the kernel, not Python
        assert stats["fastpath_from_sal"] > 100 and stats["from_sal"] < 50, stats
    else:
        assert stats["from_sal"] > 200, stats
    stop_and_check(pair, gws, before)


def test_bad_input_is_dropped_and_counted_during_a_transfer(lab, www):
    pair, gws, before = build(lab)
    start_http(pair.server, www)
    src = make_file(www, "big.bin", 20 * 1024 * 1024)
    dl = pair.client.popen(["sh", "-c", f"curl -sS --fail -m 120 --limit-rate 10M http://{VIRTUAL_ADDR}/big.bin | sha256sum"],
                           stdout=subprocess.PIPE, text=True)
    # from the client gateway's SAL address, at the server gateway: garbage, truncated,
    # bad checksums, unknown flows (a raw socket, like an attacker on the path)
    attack = (
        "import socket,os,random,struct\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_RAW,144)\n"
        "random.seed(7)\n"
        "def sal(src,dst,words=3,proto=6,csum=None,rest=b''):\n"
        "  h=struct.pack('!IIBBH',src,dst,words,proto,0)+rest\n"
        "  if csum is None:\n"
        "    t=sum(struct.unpack('!%dH'%(len(h)//2),h)); t=(t&0xffff)+(t>>16); t=(t&0xffff)+(t>>16); csum=~t&0xffff\n"
        "  return h[:10]+struct.pack('!H',csum)+h[12:]\n"
        "pk=[]\n"
        "for i in range(300): pk.append(os.urandom(random.randint(0,60)))\n"
        "for i in range(300): pk.append(sal(random.getrandbits(32),random.getrandbits(32),csum=random.getrandbits(16))+os.urandom(20))\n"
        "for i in range(300): pk.append(sal(1,random.getrandbits(32))+os.urandom(20))\n"
        "for i in range(100): pk.append(sal(1,0,words=40))\n"
        "for p in pk: s.sendto(p,('198.19.2.2',0))\n"
        "print(len(pk))\n")
    r = pair.cgw.run([sys.executable, "-c", attack], check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    out, _ = dl.communicate(timeout=150)
    assert out.split()[0] == sha256_file(src)
    stats = gws.stats("server")
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped_"))
    assert dropped >= 1000, stats
    assert stats.get("internal_errors", 0) == 0
    assert stats["malformed"] >= 300
    stop_and_check(pair, gws, before)


def test_serval_ctl_flows_lists_a_live_flow(lab):
    pair, gws, before = build(lab)
    start_py_server(pair.server, "halfclose", 8080)
    holder = pair.client.popen([sys.executable, "-c",
                                f"import socket,time\ns=socket.create_connection(('{VIRTUAL_ADDR}',80))\n"
                                "s.sendall(b'x'*1000); time.sleep(30)\n"])
    time.sleep(1.0)
    r = pair.cgw.run([sys.executable, "-m", "serval", "ctl", "--socket", gws.sockets["client"], "flows"],
                     check=False, cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    assert "198.19.1.2" in r.stdout and "established" in r.stdout and "1 flow(s)" in r.stdout
    holder.kill()
    stop_and_check(pair, gws, before)


def test_keep_client_address_mode(lab, www):
    pair, gws, before = build(lab, client_address="peer")
    server = start_py_server(pair.server, "halfclose", 8080)
    code = (f"import socket\ns=socket.create_connection(('{VIRTUAL_ADDR}',80),timeout=10)\n"
            "s.sendall(b'abc'); s.shutdown(socket.SHUT_WR); print(s.recv(100).decode())\n")
    r = pair.client.run([sys.executable, "-c", code], check=False, timeout=20)
    assert r.stdout.startswith("3 "), r.stdout + r.stderr
    # the backend saw the client gateway's address, not the server gateway's
    assert server.stdout.readline().split() == ["peer", pair.cgw_sal]
    stop_and_check(pair, gws, before)
