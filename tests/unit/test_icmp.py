"""ICMP errors about translated packets, in memory: path MTU, refusals, forgeries."""
import struct

import pytest

from gateway.translate import PASS
from sal import icmp, wire
from sal.flow import State
from sal.ip import IPv4, TCP, aton, ntoa
from tests.unit.packets import ACK, PSH, RST, SYN, tcp_packet
from tests.unit.test_translate import CGW, CLIENT, SERVER, SGW, SGW_LAN, VIP, check_tcp, handshake, make_pair

MID = "198.19.2.254"        # a router between the gateways
ELSEWHERE = "198.19.9.9"    # a forger


def data_pair(carriage="ip"):
    """An established pair and one full-sized data packet each way, as SAL."""
    client, server = make_pair(carriage)
    lport = handshake(client, server, carriage=carriage)
    up = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1001, 5001, ACK | PSH, b"u" * 1400), 1.0)
    down = server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, lport, 5001, 1001, ACK | PSH, b"d" * 1400), 1.0)
    return client, server, lport, up, down


def frag_needed(quoted: bytes, mtu: int, src=MID) -> bytes:
    dst = quoted[12:16]
    return icmp.build_error(aton(src), dst, icmp.DEST_UNREACH, icmp.FRAG_NEEDED, quoted, mtu)


def unreachable(quoted: bytes, code=icmp.HOST_UNREACH, src=MID) -> bytes:
    return icmp.build_error(aton(src), quoted[12:16], icmp.DEST_UNREACH, code, quoted)


def parse_icmp(pkt: bytes):
    ip = IPv4(pkt)
    assert ip.protocol == 1
    err = icmp.parse(pkt)          # raises on a bad checksum
    return ip, err


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_frag_needed_reaches_the_legacy_sender_as_its_own(carriage):
    client, server, lport, up, down = data_pair(carriage)
    overhead = 12 + (8 if carriage == "udp" else 0)
    # a router between the gateways cannot forward the client gateway's 1400-byte data
    assert client.from_icmp(frag_needed(up, 1400), 2.0) is None
    assert client.stats["icmp_frag_needed"] == 1
    [out] = client.outbox
    ip, err = parse_icmp(out)
    assert (ntoa(ip.src), ntoa(ip.dst)) == (VIP, CLIENT)        # toward the legacy client
    assert err.frag_needed and err.mtu == 1400 - overhead
    q = err.quoted
    assert (ntoa(q[12:16]), ntoa(q[16:20]), q[9]) == (CLIENT, VIP, 6)   # what it sent
    assert int.from_bytes(q[2:4], "big") == len(up) - overhead == 20 + 20 + 1400
    assert struct.unpack_from("!HHI", q, 20) == (40000, 80, 1001)
    # and on the other side, toward the backend
    assert server.from_icmp(frag_needed(down, 1280), 2.0) is None
    [out] = server.outbox
    ip, err = parse_icmp(out)
    assert (ntoa(ip.src), ntoa(ip.dst)) == (SGW_LAN, SERVER)
    assert err.mtu == 1280 - overhead
    assert struct.unpack_from("!HHI", err.quoted, 20) == (8080, lport, 5001)


def test_new_flows_toward_that_peer_clamp_to_the_learnt_mtu():
    client, server, lport, up, down = data_pair()
    server.from_icmp(frag_needed(down, 1400), 2.0)
    # the next SYN from the same client gateway: the backend is told a smaller MSS
    syn = client.from_legacy(tcp_packet(CLIENT, 40001, VIP, 80, 7000, flags=SYN, mss=1460), 3.0)
    to_backend = server.from_sal(syn, 3.0)
    assert struct.unpack_from("!H", to_backend, 42)[0] == 1400 - 52
    # ... and forgets it once the learnt value is old (the path may have grown)
    syn = client.from_legacy(tcp_packet(CLIENT, 40002, VIP, 80, 9000, flags=SYN, mss=1460), 700.0)
    assert struct.unpack_from("!H", server.from_sal(syn, 700.0), 42)[0] == 1500 - 52


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_forged_icmp_changes_nothing(carriage):
    client, server, lport, up, down = data_pair(carriage)
    at = 20 + (8 if carriage == "udp" else 0)
    wrong_ids = bytearray(up)
    wrong_ids[at:at + 4] = b"\x12\x34\x56\x78"             # a flowID the forger guessed
    wrong_peer = bytearray(up)
    wrong_peer[at + 4:at + 8] = b"\x00\x00\x00\x01"        # our flowID, not the peer's
    other_dst = bytearray(up)
    other_dst[16:20] = aton(ELSEWHERE)
    for quoted in (bytes(wrong_ids), bytes(wrong_peer), bytes(other_dst)):
        assert client.from_icmp(frag_needed(quoted, 576, ELSEWHERE), 2.0) is None
        assert client.from_icmp(unreachable(quoted, icmp.PORT_UNREACH, ELSEWHERE), 2.0) is None
    assert client.outbox == [] and client.peer_mtu == {}
    assert client.stats["dropped_icmp_unverified"] + client.stats["dropped_icmp_no_flow"] == 6
    assert all(f.closed_at is None for f in client.flows.values())


def test_unreachable_does_not_kill_an_established_flow():
    client, server, lport, up, down = data_pair()
    for code in (icmp.NET_UNREACH, icmp.HOST_UNREACH, icmp.PORT_UNREACH):
        assert client.from_icmp(unreachable(up, code), 2.0) is None
    assert client.stats["icmp_soft_errors"] == 3
    [flow] = client.flows.values()
    assert flow.closed_at is None and flow.sal.state == State.ESTABLISHED


def test_unreachable_for_a_syn_refuses_the_legacy_client_at_once():
    client, server = make_pair()
    syn = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1000, flags=SYN, mss=1460), 0.0)
    # the router has no live instance: it answers the SYN it cannot forward
    assert client.from_icmp(unreachable(syn, icmp.HOST_UNREACH, SGW), 0.1) is None
    [rst] = client.outbox
    t = check_tcp(rst, VIP, CLIENT)
    assert t.flags == RST | ACK and t.ack == 1001 and (t.sport, t.dport) == (80, 40000)
    assert client.stats["icmp_refused_handshake"] == 1
    [flow] = client.flows.values()
    assert flow.closed_at is not None


def test_a_syn_quote_needs_our_nonce():
    client, server = make_pair()
    syn = bytearray(client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1000, flags=SYN, mss=1460), 0.0))
    hdr, _ = wire.decode(bytes(syn[20:]))
    ctl = hdr.control
    ctl.nonce = bytes(8)                                 # everything right but the nonce
    forged = bytes(syn[:20]) + hdr.encode() + bytes(syn[20 + syn[28] * 4:])
    assert client.from_icmp(unreachable(forged), 0.1) is None
    assert client.outbox == [] and client.stats["dropped_icmp_unverified"] == 1
    [flow] = client.flows.values()
    assert flow.closed_at is None and flow.sal.state == State.SYN_SENT


def test_backend_unreachable_during_the_handshake_resets_the_peer():
    client, server = make_pair()
    syn = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1000, flags=SYN, mss=1460), 0.0)
    to_backend = server.from_sal(syn, 0.0)
    # the backend host is down: the server gateway's own kernel says so
    err = icmp.build_error(aton(SGW_LAN), aton(SGW_LAN), icmp.DEST_UNREACH, icmp.HOST_UNREACH, to_backend)
    assert server.from_icmp(err, 1.0) is None
    [sal_rst] = server.outbox
    assert wire.decode(sal_rst[20:])[0].flags & wire.RST
    # the client gateway hears it and refuses its legacy client
    assert client.from_sal(sal_rst, 1.0) is None
    [rst] = client.outbox
    t = check_tcp(rst, VIP, CLIENT)
    assert t.flags == RST | ACK and t.ack == 1001


def test_icmp_about_the_hosts_own_traffic_passes():
    client, server, lport, up, down = data_pair()
    own = tcp_packet("198.19.2.1", 5555, "198.19.7.7", 22, 1, flags=ACK)
    assert client.from_icmp(unreachable(own, src="198.19.7.7"), 1.0) is PASS
    echo = bytes(IPv4Builder.echo(aton(MID), aton(CGW)))
    assert client.from_icmp(echo, 1.0) is PASS


def test_damaged_icmp_is_dropped_and_counted():
    client, server, lport, up, down = data_pair()
    err = bytearray(frag_needed(up, 1400))
    err[30] ^= 0x40                                      # a flipped bit in the quote
    assert client.from_icmp(bytes(err), 1.0) is None
    assert client.stats["dropped_icmp_bad_checksum"] == 1 and client.peer_mtu == {}


def test_an_mtu_no_smaller_than_the_packet_is_not_believed():
    client, server, lport, up, down = data_pair()
    assert client.from_icmp(frag_needed(up, len(up)), 1.0) is None
    assert client.outbox == [] and client.stats["dropped_icmp_mtu_not_lower"] == 1


class IPv4Builder:
    @staticmethod
    def echo(src: bytes, dst: bytes) -> bytes:
        from sal.checksum import checksum
        from sal.ip import ipv4_header
        body = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping"
        body = body[:2] + checksum(body).to_bytes(2, "big") + body[4:]
        return ipv4_header(src, dst, 1, len(body)) + body


def test_mtu_auto_is_the_smallest_link_and_too_large_is_refused_with_its_line(tmp_path):
    from gateway.config import ConfigError, load
    from gateway.daemon import path_mtu

    auto = tmp_path / "auto.toml"
    auto.write_text('[gateway]\ncarriage = "ip"\n\n[[service]]\nname = "web"\nport = 80\nbackend = "198.19.3.2:80"\n')
    cfg = load(str(auto), "server")
    assert cfg.mtu == "auto"
    assert path_mtu(cfg, {"eth0": 1492, "eth1": 1500}) == 1492
    big = tmp_path / "big.toml"
    big.write_text('[gateway]\ncarriage = "ip"\nmtu = 9000\n\n[[service]]\nname = "web"\nport = 80\n'
                   'backend = "198.19.3.2:80"\n')
    cfg = load(str(big), "server")
    with pytest.raises(ConfigError, match=r"big\.toml:3: mtu = 9000 is larger than every link here"):
        path_mtu(cfg, {"eth0": 1500, "eth1": 1500})
    assert path_mtu(cfg, {"eth0": 9000}) == 9000
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nmtu = "big"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml:2: mtu: 'auto' or expected a whole number"):
        load(str(bad), "client")


def test_a_next_hop_whose_daemon_is_down_does_not_refuse():
    """A router host whose daemon died answers a SAL SYN with its kernel's protocol
    unreachable: the SYN goes on (another router takes it), the client is not refused."""
    client, server = make_pair()
    syn = client.from_legacy(tcp_packet(CLIENT, 40000, VIP, 80, 1000, flags=SYN, mss=1460), 0.0)
    assert client.from_icmp(unreachable(syn, icmp.PROTO_UNREACH, SGW), 0.1) is None
    assert client.outbox == [] and client.stats["icmp_soft_errors"] == 1
    [flow] = client.flows.values()
    assert flow.closed_at is None and flow.sal.state == State.SYN_SENT


def test_udp_toward_a_virtual_address_is_refused_at_once_and_rate_limited():
    client, server = make_pair()
    assert client.is_virtual(aton(VIP)) and not client.is_virtual(aton(SERVER))
    dgram = udp_packet(CLIENT, 5353, VIP, 53, b"query")
    assert client.refuse_datagram(dgram, 0.0) is None
    [out] = client.outbox
    ip, err = parse_icmp(out)
    assert (ntoa(ip.src), ntoa(ip.dst)) == (VIP, CLIENT)
    assert (err.type, err.code) == (icmp.DEST_UNREACH, icmp.PORT_UNREACH) and err.quoted == dgram
    for _ in range(300):                                 # a flood within one second
        client.refuse_datagram(dgram, 0.5)
    assert client.stats["icmp_port_unreachable_sent"] <= 101
    assert client.stats["dropped_udp_not_carried"] == 301


def udp_packet(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    from sal.ip import ipv4_header
    body = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return ipv4_header(aton(src), aton(dst), 17, len(body)) + body
