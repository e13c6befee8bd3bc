"""`serval dns` for real: dig, getent and curl in namespaces, dnsmasq upstreams.

    client 198.19.1.2 (+ .3) --- cgw 198.19.1.1 [serval dns, client gateway] === sgw --- server
                                  |  198.19.4.1
                                  up 198.19.4.2 [dnsmasq A], 198.19.4.3 [dnsmasq B]

One lab for the whole module (building it and starting the daemons is the slow part);
tests that break something (kill an upstream) put it back.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from dns_resolver.lab import Dnsmasq, MappedGateways, RunningResolver, dig, resolver_config
from serval import metrics as m
from tests.integration.helpers import start_http

RESOLVER = "198.19.1.1"
UP_A, UP_B = "198.19.4.2", "198.19.4.3"
FLOODER = "198.19.1.3"
TXT_CHUNK = "x" * 200
ZONE = "svc.example"
METRICS_PORT = 9467


def _unavailable():
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "dig", "dnsmasq", "curl", "getent"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (apt-get install dnsutils dnsmasq-base curl)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        return "`ip netns` is unavailable"
    return None


def upstream_args(answer: str) -> list:
    big = ",".join([TXT_CHUNK] * 4)                   # one TXT record of ~800 bytes
    return ["--no-resolv", f"--address=/local.test/{answer}", "--host-record=host.test,198.19.99.10",
            "--local-ttl=300", f"--txt-record=big.test,{big}", *[f"--txt-record=huge.test,{big}"] * 4]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    from lab.topologies import gateway_pair
    from lab.topology import Lab

    work = tmp_path_factory.mktemp("dns")
    lab = Lab()
    try:
        pair = gateway_pair(lab)
        up = lab.add_host("up")
        _, up_if = lab.link(pair.cgw, up, "198.19.4.1/24", f"{UP_A}/24")
        up.run(["ip", "addr", "add", f"{UP_B}/24", "dev", up_if])
        pair.client.run(["ip", "addr", "add", f"{FLOODER}/24", "dev", pair.client_if])
        upstreams = {UP_A: Dnsmasq(up, UP_A, args=upstream_args("198.19.99.1"), log_dir=str(work)).start(),
                     UP_B: Dnsmasq(up, UP_B, args=upstream_args("198.19.99.2"), log_dir=str(work)).start()}
        mappings = str(work / "mappings.json")
        config = resolver_config(
            listen=[RESOLVER, "127.0.0.1"], allow=["198.19.1.0/24", "127.0.0.0/8"],
            zones={ZONE: [("web", (80,)), "api"]}, upstreams=[UP_A, UP_B], mappings=mappings,
            rate=50, burst=100, timeout=0.5, metrics=f"127.0.0.1:{METRICS_PORT}")
        resolver = RunningResolver(pair.cgw, config, str(work)).start()
        www = work / "www"
        www.mkdir()
        (www / "index.html").write_text("hello from an unmodified server\n")
        start_http(pair.server, www)
        gateways = MappedGateways(pair, mappings, [(f"web.{ZONE}", 80, 8080)], str(work)).start()
        pair.client.write_etc("resolv.conf", f"nameserver {RESOLVER}\noptions timeout:2 attempts:2\n")
        yield type("Net", (), dict(lab=lab, pair=pair, up=up, upstreams=upstreams, resolver=resolver,
                                   gateways=gateways, mappings=mappings, work=work))
        assert resolver.stop() == 0, resolver.log()
        assert gateways.stop() == {"client": 0, "server": 0}
    finally:
        lab.teardown()


def ask(net, name, rtype="A", *opts, source=None, server=RESOLVER, timeout=2):
    host = net.pair.client if server == RESOLVER else net.pair.cgw
    if source:
        opts = ("-b", source, *opts)
    return dig(host, server, name, rtype, *opts, timeout=timeout)


def counters(net) -> dict:
    """The resolver's core counters, from its metrics page."""
    r = net.pair.cgw.run(["curl", "-sS", "--fail", "-m", "5", f"http://127.0.0.1:{METRICS_PORT}/metrics"])
    samples = m.parse(r.stdout)
    return {dict(labels)["stat"]: v for (name, labels), v in samples.items()
            if name == "serval_dns_stat_total"}


def mapping_of(net, name):
    with open(net.mappings) as f:
        return {m["name"]: m["address"] for m in json.load(f)["mappings"]}.get(name)


# --- the service zone ------------------------------------------------------------------

def test_service_name_over_udp_and_tcp(net):
    r = ask(net, f"web.{ZONE}")
    assert r.status == "NOERROR" and {"qr", "aa", "rd", "ra"} <= r.flags, r.output
    [(name, ttl, rtype, address)] = r.answer
    assert name == f"web.{ZONE}." and ttl == 30 and rtype == "A"
    assert address.startswith("198.18.")
    assert mapping_of(net, f"web.{ZONE}") == address          # the gateway's channel has it
    assert r.udp_size == 1232                                  # our EDNS payload size
    tcp = ask(net, f"web.{ZONE}", "A", "+tcp")
    assert tcp.values() == [address] and "aa" in tcp.flags
    mixed = ask(net, "WeB.SvC.ExAmPlE")                         # case-insensitive, case echoed
    assert mixed.values() == [address]
    assert mixed.question[0][0] == "WeB.SvC.ExAmPlE."
    again = ask(net, f"web.{ZONE}", "A", "+noedns")
    assert again.values() == [address] and again.udp_size is None


def test_service_record_types_and_nxdomain(net):
    aaaa = ask(net, f"web.{ZONE}", "AAAA")
    assert aaaa.status == "NOERROR" and aaaa.answer == [] and aaaa.authority[0][2] == "SOA"
    txt = ask(net, f"web.{ZONE}", "TXT")
    from sal.serviceid import service_id_for
    texts = [t.strip('"') for t in txt.values("TXT")]
    assert f"v=serval1 port=80 id={service_id_for(f'web.{ZONE}', 80).hex()}" in texts
    nx = ask(net, f"nosuch.{ZONE}")
    assert nx.status == "NXDOMAIN" and "aa" in nx.flags and nx.answer == []
    [(owner, ttl, rtype, data)] = nx.authority
    assert owner == f"{ZONE}." and rtype == "SOA" and data.split()[-1] == "60"
    assert mapping_of(net, f"nosuch.{ZONE}") is None


def test_clients_outside_allowed_networks_are_refused(net):
    r = dig(net.pair.cgw, RESOLVER, "x.local.test", "A", "-b", "198.19.2.1")     # from cgw's SAL side
    assert r.status == "REFUSED" and r.answer == []
    assert dig(net.pair.cgw, "127.0.0.1", "host.test").values() == ["198.19.99.10"]     # loopback allowed


# --- forwarding ----------------------------------------------------------------------------

def test_forwarded_names_cached_with_ttl(net):
    first = ask(net, "cached.local.test")
    assert first.status == "NOERROR" and first.values() == ["198.19.99.1"] and first.answer[0][1] == 300
    assert "aa" not in first.flags and "ra" in first.flags
    time.sleep(1.1)
    second = ask(net, "cached.local.test")
    assert second.values() == ["198.19.99.1"] and second.answer[0][1] <= 299     # from the cache, aged
    nx = ask(net, "nosuch.example")                      # dnsmasq: no upstream -> REFUSED/NXDOMAIN
    assert nx.status in ("NXDOMAIN", "REFUSED", "SERVFAIL")


def test_edns_buffer_sizes_truncation_and_tcp_fallback(net):
    small = ask(net, "big.test", "TXT", "+bufsize=512", "+ignore")
    assert "tc" in small.flags and small.answer == [] and small.size <= 512
    noedns = ask(net, "big.test", "TXT", "+noedns", "+ignore")
    assert "tc" in noedns.flags and noedns.answer == []
    fits = ask(net, "big.test", "TXT", "+bufsize=1232", "+ignore")
    assert "tc" not in fits.flags and len(fits.answer) == 1 and 800 < fits.size <= 1232
    retried = ask(net, "big.test", "TXT", "+bufsize=512")      # dig retries over TCP by itself
    assert "tc" not in retried.flags and len(retried.answer) == 1
    huge = ask(net, "huge.test", "TXT", "+tcp")                # > 1232: fetched upstream over TCP
    assert len(huge.answer) == 4 and huge.size > 3000, huge.output
    huge_udp = ask(net, "huge.test", "TXT", "+bufsize=4096", "+ignore")
    assert "tc" in huge_udp.flags and huge_udp.answer == []    # we never send more than 1232 over UDP


def test_upstream_failover_failure_and_recovery(net):
    a, b = net.upstreams[UP_A], net.upstreams[UP_B]
    assert ask(net, "warm.local.test").values() == ["198.19.99.1"]          # A answers
    a.stop()
    try:
        start = time.monotonic()
        assert ask(net, "f1.local.test").values() == ["198.19.99.2"]        # B takes over
        assert ask(net, "f2.local.test").values() == ["198.19.99.2"]
        assert time.monotonic() - start < 3
        b.stop()
        fail = ask(net, "f3.local.test", timeout=4)
        assert fail.status == "SERVFAIL" and fail.answer == []
        assert ask(net, "warm.local.test").values() == ["198.19.99.1"]      # still in the cache
        a.start()
        assert ask(net, "f4.local.test", timeout=4).values() == ["198.19.99.1"]   # recovery
    finally:
        for d in (a, b):
            if d.proc is None:
                d.start()
    assert "upstream 198.19.4.2:53 failed" in net.resolver.log()
    assert "upstream 198.19.4.2:53 answers again" in net.resolver.log()


# --- unmodified clients ----------------------------------------------------------------------

def test_getent_and_curl_by_name_through_both_gateways(net):
    client = net.pair.client
    r = client.run(["getent", "hosts", f"web.{ZONE}"], check=False)
    assert r.returncode == 0, r.stderr
    address = r.stdout.split()[0]
    assert address == mapping_of(net, f"web.{ZONE}")
    r = client.run(["getent", "hosts", "host.test"], check=False)
    assert r.stdout.split()[0] == "198.19.99.10"                           # forwarded upstream
    assert client.run(["getent", "hosts", f"nosuch.{ZONE}"], check=False).returncode == 2
    r = client.run(["curl", "-sS", "--fail", "-m", "20", f"http://web.{ZONE}/"], check=False, timeout=30)
    assert r.returncode == 0, (r.stderr, net.gateways.log("client"))
    assert r.stdout == "hello from an unmodified server\n"
    stats = net.gateways.ctl("client", "stats")
    assert stats["flows_established"] >= 1


# --- bad input and floods ----------------------------------------------------------------------

BAD_INPUT = r'''
import json, os, random, socket, struct, sys
from dnslib import DNSRecord
server = (sys.argv[1], 53)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(server)
def ask(data, wait=0.5):
    s.settimeout(wait)
    s.send(data)
    try:
        return s.recv(65535)
    except socket.timeout:
        return None
def rcode(reply):
    return None if reply is None else (struct.unpack("!H", reply[:2])[0], reply[3] & 0xF)
hdr = lambda ident, qd=1: struct.pack("!HHHHHH", ident, 0x0100, qd, 0, 0, 0)
out = {}
out["runt"] = rcode(ask(b"\x12\x34\x01"))
out["missing_question"] = rcode(ask(hdr(0x1001)))
out["bad_label"] = rcode(ask(hdr(0x1002) + b"\x45" + b"a" * 0x45 + b"\x00\x00\x01\x00\x01"))
out["truncated_question"] = rcode(ask(hdr(0x1003) + b"\x03web\x03sv"))
out["loop"] = rcode(ask(hdr(0x1004) + b"\xc0\x0c\x00\x01\x00\x01"))
out["loop2"] = rcode(ask(hdr(0x1005) + b"\x01a\xc0\x0c\x00\x01\x00\x01"))
good = DNSRecord.question("web.svc.example")
good.header.id = 0x1006
out["oversized"] = rcode(ask(good.pack() + bytes(6000)))
random.seed(7)
for i in range(2000):
    s.send(os.urandom(random.randint(1, 600)))
s.settimeout(0.2)
try:
    while True:
        s.recv(65535)
except socket.timeout:
    pass
good.header.id = 0x1007
reply = ask(good.pack(), wait=2)
out["after_random"] = rcode(reply)
out["after_random_answer"] = str(DNSRecord.parse(reply).rr[0].rdata) if reply else None
print(json.dumps(out))
'''


def test_bad_input_is_formerr_or_dropped_and_service_goes_on(net):
    r = net.pair.client.run([sys.executable, "-c", BAD_INPUT, RESOLVER], check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["runt"] is None                                   # no ID to answer: dropped
    for key, ident in (("missing_question", 0x1001), ("bad_label", 0x1002), ("truncated_question", 0x1003),
                       ("loop", 0x1004), ("loop2", 0x1005)):
        assert out[key] == [ident, 1], (key, out[key])            # FORMERR, with the query's ID
    assert out["oversized"] is None                              # > 4096 bytes: dropped unread
    assert out["after_random"] == [0x1007, 0]
    assert out["after_random_answer"] == mapping_of(net, f"web.{ZONE}")
    assert net.resolver.proc.poll() is None
    assert "Traceback" not in net.resolver.log()


FLOOD = r'''
import socket, sys, time
from dnslib import DNSRecord
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[2], 0))
s.connect((sys.argv[1], 53))
s.setblocking(False)
q = DNSRecord.question("web.svc.example").pack()
sent = answered = truncated = 0
def take(data):
    global answered, truncated
    if data[2] & 0x02:
        truncated += 1
    elif data[6:8] != b"\0\0":
        answered += 1
rate = float(sys.argv[4])
start = time.monotonic()
end = start + float(sys.argv[3])
while time.monotonic() < end:
    time.sleep(max(0.0, start + sent / rate - time.monotonic()))
    for _ in range(50):
        try:
            s.send(q)
            sent += 1
        except BlockingIOError:
            break
    while True:
        try:
            take(s.recv(4096))
        except (BlockingIOError, ConnectionRefusedError):
            break
time.sleep(0.3)
while True:
    try:
        take(s.recv(4096))
    except (BlockingIOError, ConnectionRefusedError):
        break
print(sent, answered, truncated)
'''


def udp_receive_errors(host) -> int:
    """Datagrams the host's kernel dropped for a full socket buffer (nstat, absolute)."""
    out = host.run(["nstat", "-az", "UdpRcvbufErrors"], check=False).stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("UdpRcvbufErrors"))


def test_a_flood_from_one_client_does_not_starve_the_others(net):
    # 10,000 queries/s, 200 times the client's limit. Faster than the resolver can read
    # (a local sender in a tight loop reaches ~180,000/s here), the kernel drops datagrams
    # of every client alike before the resolver sees any: that flood is for a filter in
    # front of the socket (hashlimit), not for the resolver's policy this test is about.
    duration, rate = 3.0, 10000
    before = counters(net)
    flood = net.pair.client.popen([sys.executable, "-c", FLOOD, RESOLVER, FLOODER, str(duration), str(rate)],
                                  stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    answered, slow = 0, 0
    for i in range(10):
        start = time.monotonic()
        r = ask(net, f"web.{ZONE}", "A", "+tries=1", source="198.19.1.2")
        answered += r.status == "NOERROR" and bool(r.values())
        slow += time.monotonic() - start > 1.0
        time.sleep(0.1)
    out, _ = flood.communicate(timeout=30)
    sent, full, truncated = map(int, out.split())
    print(f"flood: sent {sent}, answered {full}, truncated {truncated}")
    assert answered == 10 and slow == 0, (answered, slow, "kernel drops", udp_receive_errors(net.pair.cgw))
    # the flooder got its burst and its rate in answers; over it, TC replies until it
    # had ignored `burst` of them (it never asks over TCP), then nothing
    assert sent > 2000, sent
    assert full <= 100 + 50 * (duration + 0.5) + 20, (sent, full)
    assert full >= 50, (sent, full)
    after = counters(net)
    grew = {k: after[k] - before[k] for k in ("rate_limited_truncated", "rate_limited_flood", "rate_limited_dropped")}
    assert 0 < truncated <= grew["rate_limited_truncated"] <= 100, (truncated, grew)
    assert grew["rate_limited_flood"] > 0 and grew["rate_limited_dropped"] == 0, grew
    assert re.search(r"rate limit 50 queries/s per client over UDP \(burst 100\), queries over it answered TC",
                     net.resolver.log())


GLIBC_LOOKUPS = r'''
import json, socket, sys
seen = {}
for _ in range(int(sys.argv[2])):
    try:
        for *_, (address, _port) in socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET, socket.SOCK_STREAM):
            seen[address] = seen.get(address, 0) + 1
    except socket.gaierror as exc:
        seen[str(exc)] = seen.get(str(exc), 0) + 1
print(json.dumps(seen))
'''


def test_glibc_lookups_over_the_limit_are_answered_over_tcp(net):
    """glibc's stub resolver (getaddrinfo, as every unmodified program) asking far above
    the client's rate: each query over it is answered TC, glibc asks again over TCP at
    once, and every lookup gets its address; nothing is dropped (which would cost the
    client its resolv.conf timeout, 5 s by default)."""
    address = ask(net, f"web.{ZONE}").values()[0]
    before = counters(net)
    lookups = 600                                   # > burst 100 + 50/s for as long as they take
    r = net.pair.client.run([sys.executable, "-c", GLIBC_LOOKUPS, f"web.{ZONE}", str(lookups)], timeout=120)
    seen = json.loads(r.stdout)
    after = counters(net)
    assert seen == {address: lookups}, seen
    truncated = after["rate_limited_truncated"] - before["rate_limited_truncated"]
    over_tcp = after["tcp_queries"] - before["tcp_queries"]
    print(f"{lookups} lookups: {truncated} answered TC, {over_tcp} asked again over TCP")
    assert truncated > 0                       # the limit was reached ...
    assert over_tcp >= truncated               # ... and each TC was followed by the query over TCP
    for reason in ("rate_limited_dropped", "rate_limited_flood"):
        assert after[reason] == before[reason], reason
