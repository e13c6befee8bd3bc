"""Migration through the translators, in memory: RSYN, RSYN|ACK, ACK; holding; hijacks."""
import pytest

from sal import wire
from sal.ip import aton
from tests.unit.packets import ACK, PSH, tcp_packet
from tests.unit.test_translate import (CGW, CLIENT, SERVER, SGW, SGW_LAN, VIP, check_sal, check_tcp,
                                       handshake, make_pair)

CGW2, SGW2, ATTACKER = "198.19.5.1", "198.19.6.1", "198.19.9.9"


def established():
    client, server = make_pair()
    lport = handshake(client, server)
    return client, server, lport, next(iter(client.flows.values())), next(iter(server.flows.values()))


def legacy_data(seq=1001, payload=b"hello"):
    return tcp_packet(CLIENT, 40000, VIP, 80, seq, 5001, ACK | PSH, payload)


def backend_data(lport, seq=5001, payload=b"world"):
    return tcp_packet(SERVER, 8080, SGW_LAN, lport, seq, 1001, ACK | PSH, payload)


def take(t):
    out = list(t.outbox)
    t.outbox.clear()
    return out


def test_client_gateway_moves():
    client, server, lport, cflow, sflow = established()
    a1, b1 = cflow.sal.snd_nxt, sflow.sal.snd_nxt      # a+1 and b+1 after the handshake
    assert client.migrate(1.0, aton(CGW2)) == 1
    (rsyn,) = take(client)
    ip, hdr, seg = check_sal(rsyn)
    assert (ip.src, ip.dst) == (aton(CGW2), aton(SGW)) and seg == b""
    assert hdr.flags == wire.RSYN and (hdr.control.verno, hdr.control.ackno) == (a1, b1)
    # legacy data while the move is unconfirmed is held, not sent
    assert client.from_legacy(legacy_data(), 1.0) is None
    assert client.stats["packets_held"] == 1
    # the server answers to the new address, and holds its own data meanwhile
    assert server.from_sal(rsyn, 1.0) is None
    (rsynack,) = take(server)
    ip, hdr, _ = check_sal(rsynack)
    assert ip.dst == aton(CGW2) and hdr.flags == wire.RSYN | wire.ACK
    assert (hdr.control.verno, hdr.control.ackno) == (b1, a1 + 1)
    assert server.from_backend(backend_data(lport), 1.0) is None
    # the client gets RSYN|ACK: ACK, then the held data, all from the new address
    assert client.from_sal(rsynack, 1.1) is None
    ack, data = take(client)
    ip, hdr, _ = check_sal(ack)
    assert hdr.flags == wire.ACK and (hdr.control.verno, hdr.control.ackno) == (a1 + 1, b1)
    ip, hdr, seg = check_sal(data)
    assert ip.src == aton(CGW2) and seg.endswith(b"hello")
    assert client.migration_times == [pytest.approx(0.1)]
    # the ACK switches the server to the new address and releases what it held
    assert server.from_sal(ack, 1.1) is None
    (released,) = take(server)
    ip, _, seg = check_sal(released)
    assert ip.dst == aton(CGW2) and seg.endswith(b"world")
    assert sflow.peer_addr == aton(CGW2)
    # data flows both ways on the new path, checksums right at both legacy ends
    check_tcp(server.from_sal(data, 1.2), SGW_LAN, SERVER)
    check_tcp(client.from_sal(released, 1.2), VIP, CLIENT)
    check_tcp(client.from_sal(server.from_backend(backend_data(lport, 5006), 1.3), 1.3), VIP, CLIENT)


def test_packets_to_the_old_address_still_translate():
    client, server, lport, cflow, sflow = established()
    in_flight = server.from_backend(backend_data(lport), 1.0)     # sent to the old address
    client.migrate(1.0, aton(CGW2))
    check_tcp(client.from_sal(in_flight, 1.0), VIP, CLIENT)


def test_server_gateway_moves():
    client, server, lport, cflow, sflow = established()
    server.migrate(1.0, aton(SGW2))
    (rsyn,) = take(server)
    assert client.from_sal(rsyn, 1.0) is None
    (rsynack,) = take(client)
    assert server.from_sal(rsynack, 1.0) is None
    (ack,) = take(server)
    client.from_sal(ack, 1.0)
    assert cflow.peer_addr == aton(SGW2)
    ip, _, _ = check_sal(client.from_legacy(legacy_data(), 1.1))
    assert ip.dst == aton(SGW2)
    check_tcp(server.from_sal(client.from_legacy(legacy_data(1006), 1.2), 1.2), SGW_LAN, SERVER)


def test_both_ends_move_at_once():
    client, server, lport, cflow, sflow = established()
    client.migrate(1.0, aton(CGW2))
    server.migrate(1.0, aton(SGW2))
    (c_rsyn,), (s_rsyn,) = take(client), take(server)
    for _ in range(3):                       # exchange until nothing is left to say
        for pkt in c_rsyn if isinstance(c_rsyn, list) else [c_rsyn]:
            server.from_sal(pkt, 1.0)
        for pkt in s_rsyn if isinstance(s_rsyn, list) else [s_rsyn]:
            client.from_sal(pkt, 1.0)
        c_rsyn, s_rsyn = take(client), take(server)
        if not c_rsyn and not s_rsyn:
            break
    assert (cflow.local_addr, cflow.peer_addr) == (aton(CGW2), aton(SGW2))
    assert (sflow.local_addr, sflow.peer_addr) == (aton(SGW2), aton(CGW2))
    assert not cflow.sal.migrating and not sflow.sal.migrating
    check_tcp(server.from_sal(client.from_legacy(legacy_data(), 1.1), 1.1), SGW_LAN, SERVER)


def test_rsyn_is_retransmitted_then_repeated_rsyn_answered_once_more():
    client, server, lport, cflow, sflow = established()
    client.migrate(1.0, aton(CGW2))
    (rsyn,) = take(client)
    client.handle_timer(2.5)                 # the hold deadline passes: still migrating, nothing sent
    assert take(client) == []
    client.handle_timer(4.0)                 # RTO 3 s
    (again,) = take(client)
    assert again[20:] == rsyn[20:]
    server.from_sal(rsyn, 1.0)
    server.from_sal(again, 4.0)
    assert len(take(server)) == 2            # both answered RSYN|ACK
    assert server.stats["peer_migrations_seen"] == 2


def forged(flow_from, flow_to, flags, nonce=b"\x66" * 8, verno=0, src=ATTACKER, dst=SGW):
    from gateway.translate.carriage import IPCarriage
    hdr = wire.SalHeader(flow_from, flow_to, 6, [wire.Control(flags, verno, 0, nonce)])
    return IPCarriage().wrap(aton(src), aton(dst), hdr.encode(), 0)


@pytest.mark.parametrize("flags", [wire.RSYN, wire.FIN, wire.RST, wire.ACK])
def test_forged_control_with_wrong_nonce_is_dropped(flags):
    client, server, lport, cflow, sflow = established()
    attack = forged(cflow.sal.local_flow, sflow.sal.local_flow, flags, verno=sflow.sal.rcv_nxt)
    assert server.from_sal(attack, 1.0) is None
    assert server.stats["dropped_bad_nonce"] == 1
    assert take(server) == [] and sflow.peer_addr == aton(CGW) and sflow.closed_at is None
    check_tcp(server.from_sal(client.from_legacy(legacy_data(), 1.1), 1.1), SGW_LAN, SERVER)


def test_data_from_another_address_is_dropped():
    client, server, lport, cflow, sflow = established()
    pkt = bytearray(client.from_legacy(legacy_data(), 1.0))
    pkt[12:16] = aton(ATTACKER)
    assert server.from_sal(bytes(pkt), 1.0) is None
    assert server.stats["dropped_wrong_peer"] == 1


def test_hold_is_bounded():
    client, server, lport, cflow, sflow = established()
    client.migrate(1.0, aton(CGW2))
    for i in range(300):
        client.from_legacy(legacy_data(1001 + i), 1.0)
    assert client.stats["packets_held"] == 256 and client.stats["dropped_hold_full"] == 44
