"""Health checks of UDP services (gateway/health.py, gateway/routing.py): a DNS service
gets real DNS queries as probes, any other UDP service is passive only, and for both
only the backend's own datagrams (or its port unreachable) count as live traffic, never
our SAL handshake. A whole server gateway in memory on Twisted's fakes."""
import textwrap

import dnslib
import pytest

from gateway.config import load
from gateway.daemon import Gateway
from gateway.health import HealthCheck, dns_answered, dns_probe, kind_for
from gateway.translate import ClientTranslator
from gateway.translate.carriage import make_carriage
from sal import icmp
from sal.ip import aton
from sal.serviceid import ServicePrefix
from sal.service_table import Action, ServiceTable
from tests.unit import gateway_fakes as fakes
from tests.unit.test_udp_flows import check_udp, udp_packet

BACKEND, SGW_LAN = "198.19.3.2", "198.19.3.1"
DNS, SYSLOG = (BACKEND, 5300, "udp"), (BACKEND, 514, "udp")

SERVER = """
[gateway]
instance = "sgw-test"
queue = 9
sal_address = "198.19.2.2"
control_socket = "{dir}/server.sock"
state_dir = "{dir}"

[[service]]
name = "dns.svc.example"
port = 53
protocol = "udp"
backend = "198.19.3.2:5300"

[[service]]
name = "syslog.svc.example"
port = 514
protocol = "udp"
backend = "198.19.3.2:514"

[[service]]
name = "web.svc.example"
port = 5300
backend = "198.19.3.2:5300"

[routing]
routers = ["198.19.20.1"]
key = "{key}"
refresh_interval = 0.05
[routing.health]
interval = 0.1
timeout = 0.5
rise = 2
fall = 2
{extra}
"""


# --- the pieces ------------------------------------------------------------------------------

@pytest.mark.parametrize("configured, protocol, ports, kind", [
    ("tcp", "tcp", [53], "tcp"),              # a TCP service keeps its connect, even on 53
    ("tcp", "udp", [5300, 53], "dns"),        # the service's port or the backend's is DNS's
    ("tcp", "udp", [53, 5353], "dns"),
    ("tcp", "udp", [514, 514], "none"),       # any other UDP service: passive only
    ("none", "udp", [53], "none"),            # passive only asked for: kept
])
def test_a_udp_service_gets_a_check_that_fits_it(configured, protocol, ports, kind):
    assert kind_for(configured, protocol, ports) == kind


def test_the_dns_probe_is_a_real_query_and_only_its_own_answer_counts():
    query = dnslib.DNSRecord.parse(dns_probe(0x1234))
    assert query.header.id == 0x1234 and query.header.qr == 0
    assert str(query.q.qname) == "health.serval.invalid." and query.q.qtype == dnslib.QTYPE.A
    nxdomain = query.reply()
    nxdomain.header.rcode = dnslib.RCODE.NXDOMAIN
    assert dns_answered(nxdomain.pack(), 0x1234)                # any rcode: a live server
    assert not dns_answered(nxdomain.pack(), 0x1235)            # someone else's id
    assert not dns_answered(dns_probe(0x1234), 0x1234)          # our own query echoed: no answer
    other = dnslib.DNSRecord.question("other.example").reply()
    other.header.id = 0x1234
    assert not dns_answered(other.pack(), 0x1234)               # an answer to another question
    assert not dns_answered(b"\x12\x34\x80", 0x1234)


def test_a_dns_check_probes_and_its_first_result_decides():
    h = HealthCheck(interval=1.0, kind="dns")
    assert h.state == "unknown" and h.due(0.0)
    assert h.passive(True, 0.0) is None                         # traffic does not decide first
    h.started(0.0)
    assert not h.due(0.5) and h.result(True) is True and h.due(1.0)


# --- a server gateway in memory ----------------------------------------------------------------

class Datagrams(fakes.Datagrams):
    """A UDP port that can be connected (the DNS probe's)."""

    def __init__(self, protocol):
        super().__init__(protocol)
        self.peer = None

    def connect(self, host, port):
        self.peer = (host, port)

    def write(self, data, addr=None):
        super().write(data, addr or self.peer)


class Reactor(fakes.Reactor):
    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        p = Datagrams(protocol)
        self.udp.append(p)
        return p


def start(tmp_path, extra=""):
    path = tmp_path / "server.toml"
    path.write_text(textwrap.dedent(SERVER.format(dir=tmp_path, key="ab" * 32, extra=extra)))
    reactor = Reactor()
    net = fakes.Net({"198.19.2.2": "eth0", SGW_LAN: "back0"},
                    [("198.19.0.0/16", "198.19.2.2", "eth0"), ("198.19.3.0/24", SGW_LAN, "back0")],
                    {"eth0", "back0"})
    gw = Gateway(load(str(path), "server"), reactor, fakes.adapters(net, reactor))
    gw.start()
    return gw, reactor


def advance(reactor, seconds, step=0.01):
    for _ in range(round(seconds / step)):
        reactor.advance(step)


def probes(reactor) -> list:
    """The DNS probes still listening: (port, the query it sent)."""
    return [(p, p.written[0][0]) for p in reactor.udp if p.peer is not None and p.listening]


def answer(port, query: bytes) -> None:
    port.deliver(dnslib.DNSRecord.parse(query).reply().pack(), port.peer)


def state(gw, service: str) -> str:
    return next(r["state"] for r in gw.routing.services() if r["service"] == service)


def test_a_dns_service_is_checked_with_queries_and_registered_when_they_are_answered(tmp_path):
    gw, reactor = start(tmp_path)
    try:
        checks = gw.routing.checks
        assert (checks[DNS].kind, checks[SYSLOG].kind, checks[(BACKEND, 5300)].kind) == ("dns", "none", "tcp")
        advance(reactor, 0.02)
        # the TCP service on the same host:port gets its connect, the UDP ones none
        assert [(c[0], c[1]) for c in reactor.tcpClients] == [(BACKEND, 5300)]
        (port, query), = probes(reactor)
        assert port.peer == (BACKEND, 5300) and dnslib.DNSRecord.parse(query).header.qr == 0
        assert state(gw, "dns.svc.example:53/udp") == "checking"
        assert state(gw, "syslog.svc.example:514/udp") == "registered"     # passive only: offered at once
        answer(port, query)
        assert checks[DNS].state == "up" and state(gw, "dns.svc.example:53/udp") == "registered"
        assert not port.listening                                            # one socket per probe
        # refused twice (nothing listens any more): down, withdrawn; no answer at all
        # counts the same, once the probe's time-out is over
        advance(reactor, 0.1)
        (port, _), = probes(reactor)
        port.protocol.connectionRefused()
        advance(reactor, 0.1)
        (port, _), = probes(reactor)
        port.protocol.connectionRefused()
        assert checks[DNS].state == "down" and state(gw, "dns.svc.example:53/udp") == "withdrawn"
        assert "refused a DNS query" in checks[DNS].last_error
        advance(reactor, 0.1)
        assert len(probes(reactor)) == 1
        advance(reactor, 0.5)
        assert checks[DNS].last_error == "no answer to a DNS query" and checks[DNS].state == "down"
    finally:
        gw.stop()


def open_udp_flow(gw, client, sport: int, port: int) -> bytes:
    """A datagram through the server gateway: its SAL handshake done, the datagram at
    the backend (returned)."""
    client.from_legacy_udp(udp_packet("198.19.1.2", sport, "198.18.0.53", port, b"hello"), 0.0)
    syn, = client.outbox
    client.outbox.clear()
    assert gw.control_reader.packet(syn) is None
    client.from_sal(gw.injector.sent.pop(), 0.0)                 # the SYN-ACK
    ack, data = client.outbox
    client.outbox.clear()
    gw.control_reader.packet(ack)
    return gw.reader.packet(data)


def client_for(gw) -> ClientTranslator:
    ids = {s.port: s.service_id for s in gw.cfg.services if s.protocol == "udp"}
    table = ServiceTable()
    table.add(ServicePrefix(bytes(32), 0), Action.FORWARD, "198.19.2.2")
    return ClientTranslator(aton("198.19.2.1"), lambda a, p: None, table, make_carriage("ip", "client"),
                            resolve_udp=lambda a, p: ids.get(p))


def refuse(gw, to_backend: bytes) -> None:
    """The backend's kernel: port unreachable for that datagram."""
    gw.reader.packet(icmp.build_error(aton(BACKEND), aton(SGW_LAN), icmp.DEST_UNREACH, icmp.PORT_UNREACH,
                                      to_backend))


def test_a_passive_udp_backend_is_ejected_by_its_port_unreachables(tmp_path):
    gw, reactor = start(tmp_path, 'eject_time = 5')
    client = client_for(gw)
    try:
        advance(reactor, 0.05)
        check = gw.routing.checks[SYSLOG]
        to_backend = open_udp_flow(gw, client, 40000, 514)
        assert check_udp(to_backend, SGW_LAN, BACKEND)[1:] == (514, b"hello")
        # our handshake alone says nothing about the backend
        assert (check.passive_ok, check.passive_failed) == (0, 0)
        sport = check_udp(to_backend, SGW_LAN, BACKEND)[0]
        gw.reader.packet(udp_packet(BACKEND, 514, SGW_LAN, sport, b"ok"))
        assert check.passive_ok == 1                                        # it answered: live
        gw.reader.packet(udp_packet(BACKEND, 514, SGW_LAN, sport, b"again"))
        assert check.passive_ok == 1                                        # (once per flow)
        refuse(gw, open_udp_flow(gw, client, 40001, 514))
        assert check.state == "up" and state(gw, "syslog.svc.example:514/udp") == "registered"
        refuse(gw, open_udp_flow(gw, client, 40002, 514))
        assert check.state == "down" and state(gw, "syslog.svc.example:514/udp") == "withdrawn"
        assert check.last_error == "refused a datagram (port unreachable)" and check.passive_failed == 2
        assert not [p for p in reactor.udp if p.peer == (BACKEND, 514)]       # never probed
    finally:
        gw.stop()


def test_a_dns_backend_whose_handshakes_succeed_still_falls_on_its_refused_probes(tmp_path):
    """Flows keep opening (the SAL handshake is the gateways' own) while the probes are
    refused: the handshakes must not keep a dead DNS server registered."""
    gw, reactor = start(tmp_path)
    client = client_for(gw)
    try:
        advance(reactor, 0.02)
        (port, query), = probes(reactor)
        answer(port, query)
        for n in range(2):
            advance(reactor, 0.1)
            open_udp_flow(gw, client, 41000 + n, 53)
            (port, _), = probes(reactor)
            port.protocol.connectionRefused()
        assert gw.routing.checks[DNS].state == "down"
    finally:
        gw.stop()
