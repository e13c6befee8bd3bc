"""The gateway pair in memory: a legacy connection through ClientTranslator and
ServerTranslator, checking every packet that comes out (checksums included)."""
import struct

import pytest

from gateway.translate import PASS, Backend, ClientTranslator, ServerTranslator, Timeouts
from gateway.translate.carriage import make_carriage
from sal import wire
from sal.flow import State
from sal.ip import IPv4, TCP, aton, ntoa, transport_checksum_ok
from sal.serviceid import ServicePrefix, service_id_for
from sal.service_table import Action, ServiceTable
from tests.unit.packets import ACK, FIN, PSH, RST, SYN, tcp_packet

CLIENT, VIP, CGW, SGW, SGW_LAN, SERVER = "198.19.1.2", "198.18.0.10", "198.19.2.1", "198.19.2.2", "198.19.3.1", "198.19.3.2"
SID = service_id_for("web.svc.example", 80)


def make_pair(carriage="ip", keep_client_address=False):
    ctable = ServiceTable()
    ctable.add(ServicePrefix(SID, 224), Action.FORWARD, SGW)
    client = ClientTranslator(aton(CGW), lambda a, p: SID if (a, p) == (aton(VIP), 80) else None,
                              ctable, make_carriage(carriage, "client"))
    stable = ServiceTable()
    stable.add(ServicePrefix(SID), Action.DEMUX, Backend(aton(SERVER), 8080, aton(SGW_LAN)))
    server = ServerTranslator(stable, make_carriage(carriage, "server"), keep_client_address=keep_client_address)
    return client, server


def check_tcp(pkt: bytes, src: str, dst: str) -> TCP:
    ip = IPv4(pkt)
    assert ip.protocol == 6 and ntoa(ip.src) == src and ntoa(ip.dst) == dst
    assert len(pkt) == ip.total_length
    seg = pkt[ip.ihl:]
    assert transport_checksum_ok(ip.src, ip.dst, 6, seg), "legacy TCP checksum"
    return TCP(seg)


def check_sal(pkt: bytes, carriage="ip"):
    ip = IPv4(pkt)
    body = pkt[20:] if carriage == "ip" else pkt[28:]
    assert ip.protocol == (144 if carriage == "ip" else 17)
    hdr, off = wire.decode(body)
    assert hdr.checksum_ok
    seg = body[off:]
    if seg:
        assert seg[:4] == b"\0\0\0\0", "ports are zero on the wire"
        pseudo = (ip.src, ip.dst) if carriage == "ip" else (bytes(4), bytes(4))
        assert transport_checksum_ok(*pseudo, 6, seg), "SAL transport checksum"
    return ip, hdr, seg


def handshake(client, server, now=0.0, carriage="ip", cport=40000):
    syn = tcp_packet(CLIENT, cport, VIP, 80, 1000, flags=SYN, mss=1460)
    sal_syn = client.from_legacy(syn, now)
    ip, hdr, seg = check_sal(sal_syn, carriage)
    assert ntoa(ip.src) == CGW and ntoa(ip.dst) == SGW
    assert hdr.flags == wire.SYN and hdr.service.service_id == SID and hdr.dst_flow == 0
    to_backend = server.from_sal(sal_syn, now)
    t = check_tcp(to_backend, SGW_LAN, SERVER)
    assert t.dport == 8080 and t.flags == SYN and t.seq == 1000
    mss = struct.unpack_from("!H", to_backend, 40 + 2)[0]
    assert mss == 1500 - 40 - 12 - (8 if carriage == "udp" else 0)
    lport = t.sport
    synack = tcp_packet(SERVER, 8080, SGW_LAN, lport, 5000, 1001, SYN | ACK, mss=1460)
    sal_synack = server.from_backend(synack, now)
    ip, hdr, _ = check_sal(sal_synack, carriage)
    assert hdr.flags == wire.SYN | wire.ACK and hdr.service is None
    to_client = client.from_sal(sal_synack, now)
    t = check_tcp(to_client, VIP, CLIENT)
    assert (t.sport, t.dport, t.flags, t.ack) == (80, cport, SYN | ACK, 1001)
    ack = tcp_packet(CLIENT, cport, VIP, 80, 1001, 5001, ACK)
    sal_ack = client.from_legacy(ack, now)
    ip, hdr, _ = check_sal(sal_ack, carriage)
    assert hdr.flags == wire.ACK and hdr.service.service_id == SID
    check_tcp(server.from_sal(sal_ack, now), SGW_LAN, SERVER)
    return lport


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_connection_through_the_pair(carriage):
    client, server = make_pair(carriage)
    lport = handshake(client, server, carriage=carriage)
    assert all(f.state == State.ESTABLISHED for f in client.flows.values())
    assert all(f.state == State.ESTABLISHED for f in server.flows.values())
    # data both ways: base header only, payload untouched
    data = tcp_packet(CLIENT, 40000, VIP, 80, 1001, 5001, ACK | PSH, b"GET / HTTP/1.0\r\n\r\n")
    sal = client.from_legacy(data, 1.0)
    ip, hdr, seg = check_sal(sal, carriage)
    assert hdr.extensions == [] and seg.endswith(b"GET / HTTP/1.0\r\n\r\n")
    check_tcp(server.from_sal(sal, 1.0), SGW_LAN, SERVER)
    reply = tcp_packet(SERVER, 8080, SGW_LAN, lport, 5001, 1019, ACK | PSH, b"x" * 1400)
    back = client.from_sal(server.from_backend(reply, 1.0), 1.0)
    assert check_tcp(back, VIP, CLIENT).seq == 5001 and back.endswith(b"x" * 1400)
    # close: client FIN, acked; server FIN, acked; then SAL FIN/ACK each way
    fin = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1019, 6401, FIN | ACK), 2.0)
    server.from_sal(fin, 2.0)
    ack_fin = server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, lport, 6401, 1020, FIN | ACK), 2.0)
    assert client.outbox == []
    client.from_sal(ack_fin, 2.0)          # acknowledges the client's FIN: client SAL FIN
    (sal_fin,) = client.outbox
    client.outbox.clear()
    _, hdr, seg = check_sal(sal_fin, carriage)
    assert hdr.flags == wire.FIN and seg == b""
    assert server.from_sal(sal_fin, 2.0) is None      # consumed; answered with a SAL ACK
    (sal_finack,) = server.outbox
    server.outbox.clear()
    client.from_sal(sal_finack, 2.0)
    last = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1020, 6402, ACK), 2.0)
    server.from_sal(last, 2.0)              # acknowledges the server's FIN: server SAL FIN
    (sal_fin2,) = server.outbox
    server.outbox.clear()
    client.from_sal(sal_fin2, 2.0)
    (sal_ack2,) = client.outbox
    server.from_sal(sal_ack2, 2.0)
    assert [f.state for f in client.flows.values()] == [State.CLOSED]
    assert [f.state for f in server.flows.values()] == [State.CLOSED]
    # both forget the flow after the linger
    client.handle_timer(2.0 + Timeouts().linger + 0.1)
    server.handle_timer(2.0 + Timeouts().linger + 0.1)
    assert client.flows == {} and client.by_legacy == {}
    assert server.flows == {} and server.by_backend == {}
    assert lport in server.pools[(aton(SERVER), 8080)].free


def test_numbering_matches_the_reference():
    client, server = make_pair()
    handshake(client, server)
    cflow = next(iter(client.flows.values())).sal
    sflow = next(iter(server.flows.values())).sal
    assert cflow.snd_nxt == sflow.rcv_nxt and sflow.snd_nxt == cflow.rcv_nxt


def test_unknown_service_is_refused_with_rst():
    client, _ = make_pair()
    out = client.from_legacy(tcp_packet(CLIENT, 40001, "198.18.0.99", 80, 7, flags=SYN), 0.0)
    assert out is None and client.stats["dropped_no_service"] == 1
    (rst,) = client.outbox
    t = check_tcp(rst, "198.18.0.99", CLIENT)
    assert t.flags == RST | ACK and t.ack == 8


def test_non_sal_traffic_passes():
    client, server = make_pair()
    udp = tcp_packet(CLIENT, 1, SGW, 2, 0)
    assert server.from_backend(udp, 0.0) is PASS     # not a translated connection


@pytest.mark.parametrize("mangle", ["checksum", "truncate", "garbage", "bad_length"])
def test_bad_sal_packets_are_dropped_and_counted(mangle):
    client, server = make_pair()
    handshake(client, server)
    good = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1001, 5001, ACK, b"data"), 1.0)
    pkt = bytearray(good)
    if mangle == "checksum":
        pkt[30] ^= 0xFF
    elif mangle == "truncate":
        pkt = pkt[:26]
        pkt[2:4] = len(pkt).to_bytes(2, "big")
    elif mangle == "garbage":
        pkt[20:] = bytes(range(len(pkt) - 20))
    else:
        pkt[28] = 200
    before = dict(server.stats)
    assert server.from_sal(bytes(pkt), 1.0) is None
    dropped = {k: v for k, v in server.stats.items() if k.startswith("dropped_") and v != before.get(k, 0)}
    assert dropped, server.stats
    # the flow still works afterwards
    assert server.from_sal(good, 1.0) is not None


def test_syn_retransmission_and_give_up():
    client, server = make_pair()
    client.timeouts = Timeouts(handshake=1e6)   # let the control timer run out first
    syn = tcp_packet(CLIENT, 40002, VIP, 80, 1, flags=SYN)
    first = client.from_legacy(syn, 0.0)
    # the legacy client retries: the same SAL SYN again
    assert client.from_legacy(syn, 1.0)[20:] == first[20:]
    # the gateway's own control timer: 3 s, doubling
    assert client.next_deadline() == pytest.approx(3.0)
    client.handle_timer(3.0)
    assert client.outbox[-1].endswith(first[20:]) and client.stats["control_retransmits"] == 1
    t = 3.0
    for _ in range(20):
        t = client.next_deadline()
        client.handle_timer(t)
    assert client.stats["flows_failed_control_timeout"] == 1
    assert client.stats["control_retransmits"] == 14      # 15 tries in all


def test_sal_rst_for_unknown_flow():
    client, server = make_pair()
    handshake(client, server)
    data = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1001, 5001, ACK, b"x"), 1.0)
    fresh = make_pair()[1]       # a server gateway that lost its state
    assert fresh.from_sal(data, 1.0) is None
    (rst,) = fresh.outbox
    _, hdr, _ = check_sal(rst)
    assert hdr.flags == wire.RST
    # the client gateway resets the legacy client
    client.outbox.clear()
    assert client.from_sal(rst, 1.0) is None
    assert client.stats["sal_resets_received"] == 1
    (legacy_rst,) = client.outbox
    assert check_tcp(legacy_rst, VIP, CLIENT).flags & RST


def test_backend_refusal_reaches_the_client():
    client, server = make_pair()
    sal_syn = client.from_legacy(tcp_packet(CLIENT, 40003, VIP, 80, 1, flags=SYN), 0.0)
    lport = TCP(server.from_sal(sal_syn, 0.0)[20:]).sport
    refused = server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, lport, 0, 2, RST | ACK), 0.0)
    out = client.from_sal(refused, 0.0)
    assert check_tcp(out, VIP, CLIENT).flags == RST | ACK


def test_keep_client_address_mode():
    client, server = make_pair(keep_client_address=True)
    sal_syn = client.from_legacy(tcp_packet(CLIENT, 40004, VIP, 80, 1, flags=SYN), 0.0)
    check_tcp(server.from_sal(sal_syn, 0.0), CGW, SERVER)


def test_a_rst_after_both_fins_is_not_a_reset():
    """A duplicate ACK reaching a backend whose socket is already gone draws a RST; the
    TCP connection was over, so the flow still ends closed (the SAL close completes)."""
    client, server = make_pair()
    lport = handshake(client, server)
    server.from_sal(client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1001, 5001, FIN | ACK), 1.0), 1.0)
    ack_fin = server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, lport, 5001, 1002, FIN | ACK), 1.0)
    client.from_sal(ack_fin, 1.0)                          # client's FIN acked: client SAL FIN
    last = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1002, 5002, ACK), 1.0)
    server.from_sal(last, 1.0)                             # server's FIN acked: server SAL FIN
    rst = server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, lport, 5002, 0, RST), 1.0)
    client.from_sal(rst, 1.0)
    for _ in range(3):                                     # the SAL FIN/ACK exchange completes
        c, s = list(client.outbox), list(server.outbox)
        client.outbox.clear(), server.outbox.clear()
        for pkt in c:
            server.from_sal(pkt, 1.0)
        for pkt in s:
            client.from_sal(pkt, 1.0)
    assert client.stats["tcp_resets_seen"] == 1 and server.stats["tcp_resets_seen"] == 1
    assert client.stats["flows_closed"] == 1 and client.stats.get("flows_reset", 0) == 0
    assert server.stats["flows_closed"] == 1 and server.stats.get("flows_reset", 0) == 0


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_a_late_repeated_syn_keeps_the_connection(carriage):
    """On a long round trip the legacy client sends its SYN again after the SAL handshake
    completed: the flow stands, and the repeat reaches the backend (which answers it as
    TCP does) instead of replacing the flow."""
    client, server = make_pair(carriage)
    syn = tcp_packet(CLIENT, 40000, VIP, 80, 1000, flags=SYN, mss=1460)
    sal_syn = client.from_legacy(syn, 0.0)
    to_backend = server.from_sal(sal_syn, 0.0)
    lport = TCP(to_backend[20:]).sport
    synack = tcp_packet(SERVER, 8080, SGW_LAN, lport, 5000, 1001, SYN | ACK, mss=1460)
    client.from_sal(server.from_backend(synack, 0.0), 0.0)
    (flow,) = client.flows.values()
    again = client.from_legacy(syn, 1.0)              # the retransmission, after the SYN-ACK left
    ip, hdr, seg = check_sal(again, carriage)
    assert hdr.flags == wire.ACK, "it completes the SAL handshake like any first segment"
    t = check_tcp(server.from_sal(again, 1.0), SGW_LAN, SERVER)
    assert (t.flags, t.seq, t.sport, t.dport) == (SYN, 1000, lport, 8080)
    assert list(client.flows.values()) == [flow] and client.stats["syn_repeated"] == 1
    assert client.stats["sal_resets_sent"] == 0
    # a SYN with another ISN on the same ports is a new connection: the old one goes
    fresh = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 77777, flags=SYN, mss=1460), 2.0)
    assert check_sal(fresh, carriage)[1].flags == wire.SYN
    assert flow not in client.flows.values()


@pytest.mark.parametrize("carriage", ["ip", "udp"])
@pytest.mark.parametrize("side", ["legacy", "sal"])
def test_a_damaged_rst_or_fin_changes_nothing(carriage, side):
    """One flipped bit that sets RST (or FIN) on a data segment: its checksum fails, the
    receiving TCP would drop it, so the gateway drops it too, without ending the flow."""
    client, server = make_pair(carriage)
    lport = handshake(client, server, carriage=carriage)
    (cflow,) = client.flows.values()
    for flag in (RST, FIN):
        if side == "legacy":
            pkt = bytearray(tcp_packet(CLIENT, 40000, VIP, 80, 1001, 5001, ACK, b"data"))
            pkt[33] |= flag                  # the flag bit flipped after the checksum was made
            assert client.from_legacy(bytes(pkt), 1.0) is None
        else:
            sal = bytearray(server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, lport, 5001, 1001, ACK, b"z"), 1.0))
            sal[(20 if carriage == "ip" else 28) + 12 + 13] |= flag
            assert client.from_sal(bytes(sal), 1.0) is None
    assert client.stats["dropped_fin_rst_bad_checksum"] == 2
    assert cflow.closed_at is None and cflow.state == State.ESTABLISHED and cflow.legacy_fin_end is None
    # an intact RST still ends the flow
    client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1001, 5001, RST | ACK), 2.0)
    assert cflow.closed_at is not None


def test_idle_expiry_is_on_time_and_tells_both_legacy_ends():
    client, server = make_pair()
    client.timeouts = Timeouts(idle=10.0)
    lport = handshake(client, server)
    (cflow,) = client.flows.values()
    client.outbox.clear()
    client.handle_timer(9.0)
    assert client.flows                                   # not yet
    client.handle_timer(10.5)                             # idle 10 s: well before the handshake's 60
    assert not client.flows and client.stats["flows_idle_expired"] == 1
    legacy = [p for p in client.outbox if p[9] == 6]
    sal = [p for p in client.outbox if p[9] == 144]
    assert len(legacy) == 1 and legacy[0][33] & RST and legacy[0][16:20] == aton(CLIENT)
    assert len(sal) == 1 and check_sal(sal[0])[1].flags == wire.RST
    # the server gateway passes it on: the backend hears a RST too
    server.from_sal(sal[0], 10.5)
    to_backend = [p for p in server.outbox if p[9] == 6]
    assert len(to_backend) == 1 and to_backend[0][33] & RST and to_backend[0][16:20] == aton(SERVER)
    assert TCP(to_backend[0][20:]).dport == 8080 and TCP(to_backend[0][20:]).sport == lport


def test_a_rst_from_the_peer_ends_the_flow_only_at_the_exact_sequence_number():
    """RFC 5961: a RST inside the window but not at the next expected byte is passed on
    (the legacy TCP answers it with a challenge ACK) and the flow stays; the exact one,
    which a peer that really reset sends, ends it."""
    client, server = make_pair()
    lport = handshake(client, server)
    (cflow,) = client.flows.values()
    client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1001, 5001, ACK), 1.0)     # expects 5001
    blind = server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, lport, 5900, 0, RST), 1.0)
    out = client.from_sal(blind, 1.0)
    assert check_tcp(out, VIP, CLIENT).flags == RST          # passed on to the legacy TCP
    assert cflow.closed_at is None and client.stats["tcp_resets_not_exact"] == 1
    exact = server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, lport, 5001, 0, RST), 1.1)
    client.from_sal(exact, 1.1)
    assert cflow.closed_at is not None


def test_after_a_reset_late_packets_reach_neither_legacy_host():
    """The backend aborts (iperf3's server does at the end of a test, with data still
    coming): its pair is given back at once, and the next connection may take the same
    4-tuple toward the backend. The client's data still on its way must not reach the
    backend on it, nor the backend's late ACKs the client; a legacy host that sends one
    is answered with a RST at its ACK number, as the gone end's TCP would."""
    client, server = make_pair()
    lport = handshake(client, server)
    late = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1001, 5001, ACK | PSH, b"late"), 0.5)
    rst = server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, lport, 5001, 1001, RST | ACK, b""), 0.6)
    check_tcp(client.from_sal(rst, 0.6), VIP, CLIENT)
    assert client.stats["flows_reset"] == server.stats["flows_reset"] == 1
    assert server.from_sal(late, 0.7) is None
    assert server.stats["dropped_after_reset"] == 1 and not server.outbox
    # the backend's late ACK: not for the peer; a RST answers it
    assert server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, lport, 5001, 1005, ACK, b""), 0.7) is None
    (answer,) = server.outbox
    t = check_tcp(answer, SGW_LAN, SERVER)
    assert t.flags == RST and t.seq == 1005
    # and the client's side likewise
    assert client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1005, 5001, ACK | PSH, b"more"), 0.7) is None
    assert client.stats["dropped_after_reset"] == 1
    assert check_tcp(client.outbox[-1], VIP, CLIENT).flags == RST
