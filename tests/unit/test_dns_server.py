"""The UDP and TCP listeners (Twisted adapters) over in-memory transports."""
import struct

from dnslib import DNSRecord
from twisted.internet.address import IPv4Address
from twisted.internet.testing import FakeDatagramTransport, MemoryReactorClock, StringTransport

from dns_resolver.config import parse
from dns_resolver.daemon import DnsDaemon
from dns_resolver.server import TCPServer, UDPServer

CLIENT = ("198.19.1.2", 5353)


def daemon(**server):
    data = {"server": {"allow": ["198.19.1.0/24"], **server}, "upstream": {"servers": []},
            "zone": [{"name": "svc.example", "service": [{"name": "web"}]}]}
    return DnsDaemon(parse(data, "test.toml"), MemoryReactorClock())


def query(name="web.svc.example", ident=1, qtype="A"):
    q = DNSRecord.question(name, qtype)
    q.header.id = ident
    return q.pack()


def tcp_connection(d, host="198.19.1.2"):
    factory = TCPServer(d)
    proto = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    proto.callLater = d.reactor.callLater
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
    proto.makeConnection(transport)
    return factory, proto, transport


def frames(data: bytes) -> list:
    out = []
    while data:
        (n,) = struct.unpack_from("!H", data)
        out.append(DNSRecord.parse(data[2:2 + n]))
        data = data[2 + n:]
    return out


def test_udp_reply_goes_back_to_the_sender():
    d = daemon()
    udp = UDPServer(d)
    udp.transport = FakeDatagramTransport()
    udp.datagramReceived(query(ident=7), CLIENT)
    [(data, addr)] = udp.transport.written
    assert addr == CLIENT and DNSRecord.parse(data).header.id == 7


def test_udp_oversized_datagrams_are_dropped_unread():
    d = daemon()
    udp = UDPServer(d)
    udp.transport = FakeDatagramTransport()
    udp.datagramReceived(query() + bytes(5000), CLIENT)
    assert udp.transport.written == [] and d.core.stats["dropped"] == 1 and d.core.stats["queries"] == 0


def test_tcp_pipelined_queries_in_one_segment():
    d = daemon()
    _, proto, transport = tcp_connection(d)
    one, two = query(ident=1), query("nope.svc.example", ident=2)
    proto.dataReceived(struct.pack("!H", len(one)) + one + struct.pack("!H", len(two)) + two[:5])
    proto.dataReceived(two[5:])                              # the second arrives in two pieces
    replies = frames(transport.value())
    assert [r.header.id for r in replies] == [1, 2]
    assert replies[0].rr and replies[1].header.rcode == 3


def test_tcp_idle_connections_are_closed():
    d = daemon(tcp_timeout=5)
    _, proto, transport = tcp_connection(d)
    d.reactor.advance(4)
    q = query()
    proto.dataReceived(struct.pack("!H", len(q)) + q)       # activity restarts the clock
    d.reactor.advance(4)
    assert not transport.disconnecting and not getattr(transport, "disconnected", False)
    d.reactor.advance(1.5)
    assert transport.disconnecting or transport.disconnected


def test_tcp_connection_limit():
    d = daemon(tcp_connections=1)
    factory = TCPServer(d)
    assert factory.buildProtocol(IPv4Address("TCP", "198.19.1.2", 1)) is not None
    assert factory.buildProtocol(IPv4Address("TCP", "198.19.1.2", 2)) is None
    assert factory.refused == 1


def test_tcp_from_outside_is_refused_too():
    d = daemon()
    _, proto, transport = tcp_connection(d, host="203.0.113.5")
    q = query(ident=9)
    proto.dataReceived(struct.pack("!H", len(q)) + q)
    [reply] = frames(transport.value())
    assert reply.header.id == 9 and reply.header.rcode == 5


def test_over_the_rate_udp_gets_tc_and_the_same_client_over_tcp_is_answered():
    d = DnsDaemon(parse({"server": {"allow": ["198.19.1.0/24"]}, "upstream": {"servers": []},
                         "rate_limit": {"rate": 1, "burst": 3},
                         "zone": [{"name": "svc.example", "service": [{"name": "web"}]}]}, "t.toml"),
                  MemoryReactorClock())
    udp = UDPServer(d)
    udp.transport = FakeDatagramTransport()
    for ident in range(1, 7):
        udp.datagramReceived(query(ident=ident), CLIENT)
    replies = [DNSRecord.parse(data) for data, _ in udp.transport.written]
    assert [r.header.id for r in replies] == [1, 2, 3, 4, 5, 6]       # every query heard back
    assert [bool(r.header.tc) for r in replies] == [False] * 3 + [True] * 3
    assert all(r.rr for r in replies[:3]) and not any(r.rr for r in replies[3:])
    _, proto, transport = tcp_connection(d)
    for ident in (6, 7, 8):
        q = query(ident=ident)
        proto.dataReceived(struct.pack("!H", len(q)) + q)
    assert [(r.header.id, bool(r.rr)) for r in frames(transport.value())] == [(6, True), (7, True), (8, True)]
    assert d.core.stats["rate_limited_truncated"] == 3 and d.core.stats["rate_limited_dropped"] == 0
