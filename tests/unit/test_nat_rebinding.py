"""NAT rebinding over UDP carriage, in memory: a flow follows its peer to a new
address:port only once the peer answers a challenge from there; and keepalives."""
import struct

from gateway.translate import Timeouts
from sal import wire
from sal.checksum import checksum
from sal.ip import aton, ntoa
from tests.unit.packets import ACK, PSH, tcp_packet
from tests.unit.test_translate import CLIENT, SERVER, SGW_LAN, VIP, check_tcp, handshake, make_pair

NAT = "198.19.5.254"


def rebound(pkt: bytes, port: int, addr: str | None = None) -> bytes:
    """``pkt`` (SAL over UDP) as a NAT with a new mapping forwards it."""
    buf = bytearray(pkt)
    buf[20:22] = port.to_bytes(2, "big")
    if addr is not None:
        buf[12:16] = aton(addr)
        buf[10:12] = b"\0\0"
        buf[10:12] = checksum(bytes(buf[:20])).to_bytes(2, "big")
    return bytes(buf)


def to_client(pkt: bytes) -> bytes:
    """``pkt`` toward the client gateway, as the NAT forwards it back in (to its port)."""
    return pkt[:22] + (54324).to_bytes(2, "big") + pkt[24:]


def udp_dst(pkt: bytes) -> tuple[str, int]:
    return ntoa(pkt[16:20]), struct.unpack_from("!H", pkt, 22)[0]


def flags(pkt: bytes) -> int:
    return wire.decode(pkt[28:])[0].flags


def setup():
    client, server = make_pair("udp")
    lport = handshake(client, server, carriage="udp")
    [sflow] = server.flows.values()
    return client, server, lport, sflow


def up(client, seq, now):
    return client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, seq, 5001, ACK | PSH, b"u" * 100), now)


def test_a_new_port_is_followed_once_the_peer_answers_from_there():
    client, server, lport, sflow = setup()
    old = (ntoa(sflow.peer_addr), sflow.peer_port)
    # the client's NAT forgot its mapping: the same data now comes from port 40001
    data = server.from_sal(rebound(up(client, 1001, 1.0), 40001), 1.0)
    check_tcp(data, SGW_LAN, SERVER)                   # same address: the data still counts
    rsyns = [p for p in server.outbox if flags(p) & wire.RSYN]
    assert sorted(udp_dst(p) for p in rsyns) == sorted([old, (old[0], 40001)])
    server.outbox.clear()
    # the server's own data waits for the new path meanwhile
    assert server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, lport, 5001, 1101, ACK, b"d" * 50), 1.1) is None
    # the RSYN reaches the client through the new mapping; its answer comes back that way
    [rsyn] = [p for p in rsyns if udp_dst(p)[1] == 40001]
    assert client.from_sal(to_client(rsyn), 1.2) is None
    [rsyn_ack] = client.outbox
    client.outbox.clear()
    assert flags(rsyn_ack) == wire.RSYN | wire.ACK
    assert server.from_sal(rebound(rsyn_ack, 40001), 1.3) is None
    assert (ntoa(sflow.peer_addr), sflow.peer_port) == (old[0], 40001)
    assert server.stats["nat_rebindings_followed"] == 1
    # the ACK and the held data go to the new port only
    assert {udp_dst(p) for p in server.outbox} == {(old[0], 40001)}
    assert any(flags(p) == wire.ACK for p in server.outbox)
    assert server.stats["packets_released"] == 1


def test_a_late_packet_from_the_old_mapping_moves_nothing():
    client, server, lport, sflow = setup()
    port = sflow.peer_port
    late = rebound(up(client, 1001, 1.0), 39999)        # from an older mapping, queued somewhere
    server.from_sal(late, 1.0)
    [to_current] = [p for p in server.outbox if udp_dst(p)[1] == port]
    server.outbox.clear()
    # the copy to port 39999 is lost (no mapping there now); the current path answers
    client.from_sal(to_current, 1.1)
    server.from_sal(client.outbox.pop(), 1.2)
    assert sflow.peer_port == port and server.stats["nat_rebindings_followed"] == 0
    assert sflow.held is None                           # and nothing waits any more


def test_data_from_another_address_waits_for_the_answer():
    client, server, lport, sflow = setup()
    moved = rebound(up(client, 1001, 1.0), 40001, NAT)
    assert server.from_sal(moved, 1.0) is None          # not translated before validation
    assert server.stats["dropped_wrong_peer"] == 1 and server.stats["path_challenges_sent"] == 1
    # nobody answers from there (a forgery): the flow stays where it was
    assert ntoa(sflow.peer_addr) != NAT and sflow.rebind_to == (aton(NAT), 40001)


def test_keepalives_on_quiet_flows_only():
    client, server = make_pair("udp")
    client.timeouts = Timeouts(keepalive=25.0)
    handshake(client, server, carriage="udp")
    client.outbox.clear()
    [flow] = client.flows.values()
    assert client.next_deadline() == flow.last_seen + 25.0
    up(client, 1001, 10.0)                              # traffic at 10 s
    client.handle_timer(25.0)
    assert client.outbox == [] and client.next_deadline() == 37.5
    client.handle_timer(37.5)                           # quiet for 27.5 s now
    [ka] = client.outbox
    assert flags(ka) == wire.ACK and client.stats["keepalives_sent"] == 1
    # the peer takes it quietly: nothing to answer, nothing dropped
    assert server.from_sal(ka, 50.0) is None
    assert server.outbox == [] and not any(k.startswith("dropped") for k in server.stats)


def test_a_handshake_follows_a_rebinding_by_its_repeated_syn():
    client, server = make_pair("udp")
    syn = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1000, flags=0x02, mss=1460), 0.0)
    server.from_sal(syn, 0.0)
    [sflow] = server.flows.values()
    # the backend's SYN-ACK goes out, and is lost at a NAT that just forgot the mapping
    synack = server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, sflow.legacy_dport, 5000, 1001, 0x12,
                                            mss=1460), 0.1)
    assert udp_dst(synack)[1] == 54324
    # the client gateway's SYN again, through the NAT's new mapping: the same nonce
    client.handle_timer(3.0)                            # its SYN retransmission
    [again] = [p for p in client.outbox if flags(p) & wire.SYN]
    server.from_sal(rebound(again, 40001), 3.0)
    assert sflow.peer_port == 40001 and server.stats["nat_rebindings_followed"] == 1
    synack = server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, sflow.legacy_dport, 5000, 1001, 0x12,
                                            mss=1460), 3.1)
    assert udp_dst(synack)[1] == 40001


def test_a_fin_waiting_for_its_answer_is_the_challenge():
    client, server, lport, sflow = setup()
    # the backend finished: its FIN, then our SAL FIN once the client acknowledged it
    server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, lport, 5001, 1001, ACK | 0x01), 1.0)
    ack = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1001, 5002, ACK), 1.1)
    server.outbox.clear()
    assert server.from_sal(ack, 1.1) is not None
    [fin] = server.outbox
    assert flags(fin) == wire.FIN
    server.outbox.clear()
    # ... lost at the NAT, which rebinds: the client's next packet comes from a new port
    server.from_sal(rebound(up(client, 1001, 2.0), 40001), 2.0)
    assert sorted(udp_dst(p)[1] for p in server.outbox if flags(p) == wire.FIN) == [40001, 54324]
    [fin_again] = [p for p in server.outbox if udp_dst(p)[1] == 40001]
    server.outbox.clear()
    client.from_sal(to_client(fin_again), 2.1)
    [fin_ack] = [p for p in client.outbox if flags(p) & wire.ACK]
    server.from_sal(rebound(fin_ack, 40001), 2.2)
    assert sflow.peer_port == 40001 and sflow.rebind_to is None
