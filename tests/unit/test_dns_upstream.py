"""Forwarding (Twisted adapter) with a fake reactor: timeouts, failover, TCP fallback."""
import struct

import pytest
from dnslib import QTYPE, RR, A, DNSRecord
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dns_resolver.upstream import Forwarder


class FakePort:
    """A connected UDP socket: records what is sent."""

    def __init__(self, proto):
        self.proto, self.sent, self.peer, self.closed = proto, [], None, False

    def connect(self, host, port):
        self.peer = (host, port)

    def write(self, data, addr=None):
        self.sent.append(data)

    def stopListening(self):
        self.closed = True

    def reply(self, data):
        self.proto.datagramReceived(data, self.peer)


class FakeConnector:
    def __init__(self, host, port, factory):
        self.host, self.port, self.factory, self.disconnected = host, port, factory, False
        self.proto = self.transport = None

    def connect(self):
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def sent(self):
        data = self.transport.value()
        (length,) = struct.unpack_from("!H", data)
        return data[2:2 + length]

    def reply(self, data):
        self.proto.dataReceived(struct.pack("!H", len(data)) + data)

    def disconnect(self):
        self.disconnected = True


class FakeReactor(Clock):
    def __init__(self):
        super().__init__()
        self.udp, self.tcp = [], []

    def listenUDP(self, port, proto, interface="", maxPacketSize=8192):
        p = FakePort(proto)
        proto.makeConnection(p)
        self.udp.append(p)
        return p

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        c = FakeConnector(host, port, factory)
        self.tcp.append(c)
        return c


QUERY = DNSRecord.question("www.example.org").pack()


def answer_to(sent: bytes, address="192.0.2.1", rcode=0, tc=False, ident=None):
    q = DNSRecord.parse(sent)
    r = q.reply()
    if ident is not None:
        r.header.id = ident
    r.header.rcode = rcode
    r.header.tc = 1 if tc else 0
    if not tc and rcode == 0:
        r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(address), ttl=60))
    return r.pack()


@pytest.fixture
def setup():
    reactor = FakeReactor()
    fwd = Forwarder(reactor, [("198.19.4.2", 53), ("198.19.4.3", 53)], timeout=1.0, retry_down_after=30)
    results = []
    return reactor, fwd, results


def run(fwd, results):
    fwd.query(QUERY).addCallback(results.append)


def test_first_upstream_answers(setup):
    reactor, fwd, results = setup
    run(fwd, results)
    [port] = reactor.udp
    assert port.peer == ("198.19.4.2", 53)
    sent = port.sent[0]
    assert sent[2:] == QUERY[2:]                     # only the ID is ours
    port.reply(answer_to(sent))
    assert str(DNSRecord.parse(results[0]).rr[0].rdata) == "192.0.2.1"
    assert port.closed and not reactor.getDelayedCalls()


def test_timeout_fails_over_and_marks_the_upstream_down(setup):
    reactor, fwd, results = setup
    run(fwd, results)
    reactor.advance(0.99)
    assert len(reactor.udp) == 1
    reactor.advance(0.02)                            # past the timeout: the second upstream
    assert reactor.udp[0].closed and reactor.udp[1].peer == ("198.19.4.3", 53)
    reactor.udp[1].reply(answer_to(reactor.udp[1].sent[0], "192.0.2.3"))
    assert str(DNSRecord.parse(results[0]).rr[0].rdata) == "192.0.2.3"
    # the next query goes to the second first; after retry_down_after the first again
    run(fwd, results)
    assert reactor.udp[2].peer == ("198.19.4.3", 53)
    reactor.udp[2].reply(answer_to(reactor.udp[2].sent[0]))
    reactor.advance(30)
    run(fwd, results)
    assert reactor.udp[3].peer == ("198.19.4.2", 53)


def test_port_unreachable_fails_over_at_once(setup):
    reactor, fwd, results = setup
    run(fwd, results)
    reactor.udp[0].proto.connectionRefused()
    assert reactor.udp[1].peer == ("198.19.4.3", 53) and reactor.seconds() == 0


def test_all_failing_gives_none(setup):
    reactor, fwd, results = setup
    run(fwd, results)
    reactor.advance(1.0)
    reactor.advance(1.0)
    assert results == [None] and fwd.stats["all_failed"] == 1
    assert all(p.closed for p in reactor.udp)


def test_replies_with_another_id_or_question_are_ignored(setup):
    reactor, fwd, results = setup
    run(fwd, results)
    port = reactor.udp[0]
    sent = port.sent[0]
    ident = struct.unpack("!H", sent[:2])[0]
    port.reply(answer_to(sent, "6.6.6.6", ident=(ident + 1) & 0xFFFF))     # spoofed
    other = answer_to(DNSRecord.question("evil.example").pack(), "6.6.6.6", ident=ident)
    port.reply(other)
    port.reply(b"\x00\x01")
    assert results == [] and fwd.stats["mismatched"] == 3
    port.reply(answer_to(sent))
    assert str(DNSRecord.parse(results[0]).rr[0].rdata) == "192.0.2.1"


def test_servfail_tries_the_next_upstream_without_marking_it_down(setup):
    reactor, fwd, results = setup
    run(fwd, results)
    reactor.udp[0].reply(answer_to(reactor.udp[0].sent[0], rcode=2))
    reactor.udp[1].reply(answer_to(reactor.udp[1].sent[0], "192.0.2.9"))
    assert str(DNSRecord.parse(results[0]).rr[0].rdata) == "192.0.2.9"
    assert not fwd.upstreams[0].down


def test_truncated_answer_is_asked_again_over_tcp(setup):
    reactor, fwd, results = setup
    run(fwd, results)
    reactor.udp[0].reply(answer_to(reactor.udp[0].sent[0], tc=True))
    [conn] = reactor.tcp
    assert (conn.host, conn.port) == ("198.19.4.2", 53)
    conn.connect()
    sent = conn.sent()
    assert sent[2:] == QUERY[2:]
    conn.reply(answer_to(sent, "192.0.2.77"))
    reply = DNSRecord.parse(results[0])
    assert not reply.header.tc and str(reply.rr[0].rdata) == "192.0.2.77"
    assert conn.disconnected


def test_truncated_answer_is_kept_when_tcp_fails(setup):
    reactor, fwd, results = setup
    run(fwd, results)
    reactor.udp[0].reply(answer_to(reactor.udp[0].sent[0], tc=True))
    reactor.advance(1.0)                        # TCP to the first: no answer
    reactor.udp[1].reply(answer_to(reactor.udp[1].sent[0], tc=True))
    reactor.advance(1.0)                        # TCP to the second: no answer
    assert DNSRecord.parse(results[0]).header.tc
