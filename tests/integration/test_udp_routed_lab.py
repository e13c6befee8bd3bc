"""A UDP service by name through the routed deployment, for real: two replicas, each a
dnsmasq behind its own server gateway, reached from an unmodified client through the
client gateway and the service routers.

    client --- cgw ---+--- r0, r1 (service routers)
                      +--- sgw0 --- srv0 (dnsmasq: answers 198.19.9.10)
                      +--- sgw1 --- srv1 (dnsmasq: answers 198.19.9.11)

Every query is a new socket, so a new SAL flow whose SYN a router sends to a registered
replica. The server gateways register the UDP service (``dns.svc.example:53/udp``) with
no health settings of their own for it: it must be registered all the same (a DNS
service gets a real DNS query as its check, not a TCP connect).
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from lab.routed import VIRTUAL_ADDR, Knobs, RoutedDeployment
from lab.topologies import routed_replicas
from lab.topology import Lab

SERVICE = "dns.svc.example"
DNS_PORT = 5300
ANSWERS = {"198.19.9.10": "srv0", "198.19.9.11": "srv1"}
QUERIES = 200

pytestmark = pytest.mark.skipif(not (shutil.which("dnsmasq") and shutil.which("dig")),
                                reason="needs dnsmasq and dig")

# A stream of DNS queries, each from a new connected socket: STREAM SECONDS RATE TIMEOUT.
# Prints [[sent_at, answered_at, answer or "", error], ...] (time.monotonic: one clock
# for every process on the host).
STREAM_PY = r'''
import json, socket, struct, sys, threading, time
addr, seconds, rate, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
def query(i):
    q = b"".join(bytes([len(l)]) + l.encode() for l in f"s{i}.test.example".split(".")) + b"\0"
    return struct.pack("!HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)
results, lock = [], threading.Lock()
def ask(i):
    t0, answer, error = time.monotonic(), "", ""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.connect((addr, 53))
            s.send(query(i))
            reply = s.recv(512)
            if reply[:2] == query(i)[:2] and len(reply) >= 16:
                answer = socket.inet_ntoa(reply[-4:])
            else:
                error = "bad reply"
    except OSError as exc:
        error = type(exc).__name__
    with lock:
        results.append((t0, time.monotonic(), answer, error))
threads, start = [], time.monotonic()
for i in range(int(seconds * rate)):
    delay = start + i / rate - time.monotonic()
    if delay > 0: time.sleep(delay)
    t = threading.Thread(target=ask, args=(i,)); t.start(); threads.append(t)
for t in threads: t.join()
print(json.dumps(sorted(results)))
'''


def start_dnsmasq(host, address: str, answer: str) -> subprocess.Popen:
    proc = host.popen(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", f"--port={DNS_PORT}",
                       f"--listen-address={address}", "--bind-interfaces", "--no-resolv", "--no-hosts",
                       "--pid-file=", "--user=root", f"--address=/test.example/{answer}"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        r = host.run(["dig", f"@{address}", "-p", str(DNS_PORT), "+short", "+tries=1", "+time=1",
                      "up.test.example"], check=False)
        if r.stdout.split() == [answer]:
            return proc
        assert proc.poll() is None and time.monotonic() < deadline, f"dnsmasq did not answer: {r.stdout}"


def add_dns_service(dep: RoutedDeployment) -> None:
    """The UDP service, appended to the configs the deployment wrote (before [routing],
    so it is a [[service]] of the gateway, not of a routing table)."""
    for name, path in dep.configs.items():
        if name.startswith("r"):
            continue
        if name == "cgw":
            svc = f'[[service]]\nname = "{SERVICE}"\naddress = "{VIRTUAL_ADDR}"\nport = 53\nprotocol = "udp"\n\n'
        else:
            i = int(name[3:])
            svc = (f'[[service]]\nname = "{SERVICE}"\nport = 53\nprotocol = "udp"\n'
                   f'backend = "{dep.topo.server_addr(i)}:{DNS_PORT}"\n\n')
        text = path.read_text()
        path.write_text(text.replace("[routing]\n", svc + "[routing]\n", 1))


def dns_instances(dep, router: str) -> set:
    return {row["instance"] for row in dep.ctl(router, "services")
            if row["service"] == SERVICE and row["health"] == "registered"}


@pytest.fixture
def dep():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    with Lab() as lab:
        topo = routed_replicas(lab)
        d = RoutedDeployment(topo, Knobs(weights=(1, 1)))
        add_dns_service(d)
        d.dns = {i: start_dnsmasq(topo.servers[i], topo.server_addr(i), answer)
                 for i, answer in enumerate(ANSWERS)}
        try:
            d.start()
            d.wait_for(lambda: all(len(dns_instances(d, r)) == 2 for r in ("r0", "r1")), 10,
                       "the DNS service's two instances registered at both routers")
            yield d
        finally:
            for name in list(d.procs):
                d.kill(name)


def test_dig_by_the_routers_every_query_answered_by_a_replica(dep, tmp_path):
    batch = tmp_path / "queries"
    batch.write_text("".join(f"q{i}.test.example A\n" for i in range(QUERIES)))
    r = dep.topo.client.run(["dig", f"@{VIRTUAL_ADDR}", "+short", "+tries=2", "+time=3", "-f", str(batch)],
                            check=False, timeout=300)
    answers = [line for line in r.stdout.split("\n") if line]
    seen = {ANSWERS.get(a, a) for a in answers}
    assert len(answers) == QUERIES and seen <= set(ANSWERS.values()), (r.stdout[-1000:], r.stderr[-1000:])
    # weights 1:1, 200 flows each routed on its own: both replicas serve (0.5^200 otherwise)
    assert seen == {"srv0", "srv1"}, seen
    rows = [row for row in dep.ctl("sgw0", "services") if row["service"].startswith(SERVICE)]
    assert rows and rows[0]["health"] == "up", rows


@pytest.mark.parametrize("victim", ["server", "gateway"])
def test_a_replica_killed_during_a_stream_new_flows_go_to_the_other(dep, victim):
    """srv0's dnsmasq (its gateway's check finds it gone) or sgw0 itself (kill -9: its
    registration expires) dies mid-stream. Queries sent once both routers have withdrawn
    it are all answered, by srv1; earlier ones toward srv0 may be lost or refused."""
    client = dep.topo.client.popen([sys.executable, "-c", STREAM_PY, VIRTUAL_ADDR, "6", "40", "2"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dep.wait_for(lambda: all(dep.ctl(f"sgw{i}", "stats").get("udp_flows_opened", 0) >= 5 for i in (0, 1)),
                 10, "the stream running on both replicas")
    if victim == "server":
        dep.dns[0].kill()
        dep.dns[0].wait()
    else:
        dep.kill("sgw0")
    killed = time.monotonic()
    dep.wait_for(lambda: all(dns_instances(dep, r) == {dep.topo.sgw_sal(1)} for r in ("r0", "r1")), 10,
                 "srv0 withdrawn at both routers")
    withdrawn = time.monotonic()
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    results = json.loads(out)
    # both replicas answered until the kill (a query in flight at the kill may be lost)
    answered_before = [r for r in results if r[1] < killed and r[2]]
    after = [r for r in results if r[0] > withdrawn]
    assert {ANSWERS.get(r[2]) for r in answered_before} == {"srv0", "srv1"}, answered_before[:20]
    assert after, f"the stream ended before srv0 was withdrawn ({withdrawn - killed:.2f} s after the kill)"
    wrong = [r for r in after if ANSWERS.get(r[2]) != "srv1"]
    assert not wrong, (len(wrong), len(after), wrong[:10])
