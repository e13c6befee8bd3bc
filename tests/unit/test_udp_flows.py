"""Legacy UDP as SAL flows (gateway/translate/udp.py): the reference's connected-UDP
exchange (../shared/captures/udp_basic.pcap) read and rewritten byte for byte, our
handshake beside it, and datagrams through a client and server translator in memory."""
import struct
from pathlib import Path

import pytest

from gateway.translate import Backend, ClientTranslator, PASS, ServerTranslator, Timeouts
from gateway.translate.carriage import ip_header, make_carriage
from gateway.translate.udp import MAX_PENDING
from sal import icmp, wire
from sal.flow import State
from sal.ip import IPv4, aton, ntoa, transport_checksum, transport_checksum_ok
from sal.pcap import read_pcap
from sal.serviceid import ServicePrefix, parse_service_id, service_id_for
from sal.service_table import Action, ServiceTable
from tests.unit.packets import SYN, tcp_packet

ROOT = Path(__file__).resolve().parents[2]
CAPTURE = ROOT.parent / "shared" / "captures" / "udp_basic.pcap"

CLIENT, VIP, CGW, SGW, SGW_LAN, SERVER = ("198.19.1.2", "198.18.0.53", "198.19.2.1", "198.19.2.2",
                                          "198.19.3.1", "198.19.3.2")
SID = service_id_for("dns.svc.example", 53)
TCP_SID = service_id_for("web.svc.example", 80)


def udp_packet(src: str, sport: int, dst: str, dport: int, payload: bytes, ident: int = 7,
               checksum: bool = True) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if checksum:
        csum = transport_checksum(aton(src), aton(dst), 17, seg, 6) or 0xFFFF
        seg = seg[:6] + struct.pack("!H", csum) + seg[8:]
    return ip_header(aton(src), aton(dst), 17, 20 + len(seg), ident, 64, 0, 0x4000) + seg


def check_udp(pkt: bytes, src: str, dst: str) -> tuple[int, int, bytes]:
    """(source port, destination port, payload) of a legacy datagram, every field checked."""
    ip = IPv4(pkt)
    assert ip.protocol == 17 and (ntoa(ip.src), ntoa(ip.dst)) == (src, dst)
    assert len(pkt) == ip.total_length
    seg = pkt[ip.ihl:]
    sport, dport, length, csum = struct.unpack_from("!HHHH", seg)
    assert length == len(seg)
    assert csum and transport_checksum_ok(ip.src, ip.dst, 17, seg), "legacy UDP checksum"
    return sport, dport, seg[8:]


def check_sal(pkt: bytes):
    """(IPv4, SalHeader, transport) of a SAL packet over either carriage, checked."""
    ip = IPv4(pkt)
    over_udp = ip.protocol == 17
    assert ip.protocol == wire.PROTO_SAL or (over_udp and set(struct.unpack_from("!HH", pkt, 20)) == {54324, 54325})
    hdr, off = wire.decode(pkt, ip.ihl + (8 if over_udp else 0))
    assert hdr.checksum_ok and hdr.protocol == 17
    seg = pkt[off:]
    if seg:
        assert seg[:4] == b"\0\0\0\0", "ports are zero on the wire"
        assert struct.unpack_from("!H", seg, 4)[0] == len(seg)
        pseudo = (bytes(4), bytes(4)) if over_udp else (ip.src, ip.dst)
        assert transport_checksum_ok(*pseudo, 17, seg)
    return ip, hdr, seg


def make_pair(mtu=1500, timeouts=None, carriage="ip"):
    ctable = ServiceTable()
    ctable.add(ServicePrefix(SID, 224), Action.FORWARD, SGW)
    ctable.add(ServicePrefix(TCP_SID, 224), Action.FORWARD, SGW)
    udp_services = {(aton(VIP), 53): SID}
    client = ClientTranslator(aton(CGW), lambda a, p: TCP_SID if (a, p) == (aton(VIP), 80) else None,
                              ctable, make_carriage(carriage, "client"), mtu=mtu,
                              timeouts=timeouts or Timeouts(),
                              resolve_udp=lambda a, p: udp_services.get((a, p)))
    stable = ServiceTable()
    stable.add(ServicePrefix(SID), Action.DEMUX, Backend(aton(SERVER), 5300, aton(SGW_LAN), "dns", 17))
    stable.add(ServicePrefix(TCP_SID), Action.DEMUX, Backend(aton(SERVER), 8080, aton(SGW_LAN), "web"))
    server = ServerTranslator(stable, make_carriage(carriage, "server"), mtu=mtu, timeouts=timeouts or Timeouts())
    return client, server


def take(translator) -> list:
    out = list(translator.outbox)
    translator.outbox.clear()
    return out


def open_flow(client, server, now=0.0, sport=5353, payload=b"query"):
    """A first datagram through the pair: returns (the backend's view of it, our port there)."""
    assert client.from_legacy_udp(udp_packet(CLIENT, sport, VIP, 53, payload), now) is None   # held
    (syn,) = take(client)
    assert server.from_sal(syn, now) is None
    (synack,) = take(server)
    assert client.from_sal(synack, now) is None
    ack, data = take(client)
    assert server.from_sal(ack, now) is None and not take(server)
    to_backend = server.from_sal(data, now)
    bsport, bdport, got = check_udp(to_backend, SGW_LAN, SERVER)
    assert bdport == 5300 and got == payload
    return bsport


# --- the reference's exchange ------------------------------------------------------

def reference_packets():
    if not CAPTURE.parent.is_dir():
        pytest.skip(f"reference captures not found at {CAPTURE.parent} (they live in the shared "
                    "workspace beside the repository, not in a plain clone)")
    assert CAPTURE.is_file(), f"{CAPTURE} missing from the captures folder"
    out = []
    for _, pkt in read_pcap(CAPTURE.read_bytes()):
        ip = IPv4(pkt)
        hdr, off = wire.decode(pkt[:ip.total_length], ip.ihl)
        out.append((ip, hdr, pkt[ip.ihl:off], pkt[off:ip.total_length], pkt[:ip.total_length]))
    return out


def test_every_reference_packet_decodes_and_reencodes_byte_identical():
    recs = reference_packets()
    assert len(recs) == 8
    for ip, hdr, sal_bytes, seg, pkt in recs:
        assert hdr.checksum_ok and hdr.protocol == 17
        rebuilt = ip_header(ip.src, ip.dst, wire.PROTO_SAL, ip.total_length, ip.ident, ip.ttl, ip.tos,
                            ip.frag) + hdr.encode() + seg
        assert rebuilt == pkt
    kinds = [(hdr.flags, len(seg)) for _, hdr, _, seg, _ in recs]
    assert kinds[:4] == [(wire.SYN, 8), (wire.SYN | wire.ACK, 8), (wire.ACK, 8), (0, 8 + len(b"hello serval"))]
    assert all(k == (wire.FIN, 0) for k in kinds[4:])                # FIN, retransmitted
    syn, synack, ack, data = (r[3] for r in recs[:4])
    for (ip, _, _, seg, _) in (recs[0], recs[3]):                    # checksummed: SYN and data
        assert seg[:4] == b"\0\0\0\0" and seg[6:8] != b"\0\0"
        assert transport_checksum(ip.src, ip.dst, 17, seg, 6) == struct.unpack_from("!H", seg, 6)[0]
    assert synack == ack == b"\0\0\0\0\0\x08\0\0"                   # left 0 by the reference


def test_our_handshake_beside_the_reference():
    ref = reference_packets()
    client, server = make_pair()
    assert client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"hello serval"), 0.0) is None
    (syn,) = take(client)
    server.from_sal(syn, 0.0)
    (synack,) = take(server)
    client.from_sal(synack, 0.0)
    ack, data = take(client)
    ours = [check_sal(p) for p in (syn, synack, ack, data)]
    for (ip, hdr, seg), (rip, rhdr, _, rseg, _) in zip(ours, ref[:4]):
        assert [type(e) for e in hdr.extensions] == [type(e) for e in rhdr.extensions]
        assert hdr.flags == rhdr.flags and hdr.protocol == rhdr.protocol == 17
        assert len(seg) == len(rseg) and seg[:6] == rseg[:6]        # ports 0, same length
        assert (seg[6:8] == b"\0\0") == (rseg[6:8] == b"\0\0")       # checksummed where it is
    # the datagram as the reference carries it (its checksum covers other addresses)
    assert ours[3][2][:6] + ours[3][2][8:] == ref[3][3][:6] + ref[3][3][8:]
    # numbering as the reference's: SYN-ACK acks a+1, ACK is a+1 / b+1
    a, b = ours[0][1].control.verno, ours[1][1].control.verno
    assert ours[1][1].control.ackno == a + 1
    assert (ours[2][1].control.verno, ours[2][1].control.ackno) == (a + 1, b + 1)
    assert ours[0][1].service.service_id == SID and ours[2][1].service.service_id == SID
    # and the idle close is the reference's FIN: control only, protocol 17, verno a+1
    client.handle_timer(0.0 + Timeouts().udp_idle + 0.1)
    (fin,) = take(client)
    ip, hdr, seg = check_sal(fin)
    _, rhdr, rsal, rseg, _ = ref[4]
    assert seg == rseg == b"" and [type(e) for e in hdr.extensions] == [type(e) for e in rhdr.extensions]
    assert hdr.flags == rhdr.flags == wire.FIN and hdr.control.verno == a + 1
    assert len(fin) - 20 == len(rsal)


def test_reference_syn_is_answered_by_our_server_gateway():
    ref = reference_packets()
    sid = parse_service_id("16385")
    stable = ServiceTable()
    stable.add(ServicePrefix(sid), Action.DEMUX, Backend(aton(SERVER), 5300, aton(SGW_LAN), "", 17))
    server = ServerTranslator(stable, make_carriage("ip", "server"))
    syn = ref[0][4]
    assert server.from_sal(syn, 0.0) is None
    (synack,) = take(server)
    ip, hdr, seg = check_sal(synack)
    rip, rhdr, _, rseg, _ = ref[1]
    assert (ip.src, ip.dst) == (rip.src, rip.dst)
    assert hdr.dst_flow == rhdr.dst_flow == ref[0][1].src_flow
    assert hdr.flags == rhdr.flags and hdr.control.ackno == rhdr.control.ackno and seg == rseg


# --- datagrams through the pair -------------------------------------------------------

@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_datagrams_both_ways_through_the_pair(carriage):
    client, server = make_pair(carriage=carriage)
    bport = open_flow(client, server)
    assert server.stats["udp_flows_opened"] == 1
    for i in range(5):
        reply = udp_packet(SERVER, 5300, SGW_LAN, bport, b"answer %d" % i)
        sal = server.from_backend_udp(reply, 1.0 + i)
        ip, hdr, seg = check_sal(sal)
        assert hdr.extensions == [] and ntoa(ip.dst) == CGW
        assert check_udp(client.from_sal(sal, 1.0 + i), VIP, CLIENT) == (53, 5353, b"answer %d" % i)
        query = client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"q%d" % i), 1.0 + i)
        assert check_udp(server.from_sal(query, 1.0 + i), SGW_LAN, SERVER) == (bport, 5300, b"q%d" % i)
    # a datagram without a checksum keeps none
    sal = client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"plain", checksum=False), 7.0)
    assert check_sal(sal)[2][6:8] == b"\0\0"
    out = server.from_sal(sal, 7.0)
    assert out[26:28] == b"\0\0" and out.endswith(b"plain")
    assert len(client.flows) == len(server.flows) == 1
    assert [f.state for f in client.flows.values()] == [State.ESTABLISHED]
    # another client port: another flow, another port toward the backend
    other = open_flow(client, server, 8.0, sport=5354)
    assert other != bport and len(server.flows) == 2
    # a backend datagram to no flow of ours is not ours
    assert server.from_backend_udp(udp_packet(SERVER, 5300, SGW_LAN, 1, b"x"), 9.0) is PASS


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_datagrams_before_the_synack_are_held_bounded_then_sent_in_order(carriage):
    client, server = make_pair(carriage=carriage)
    for i in range(MAX_PENDING + 4):
        assert client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"d%d" % i), 0.0) is None
    assert client.stats["udp_held"] == MAX_PENDING
    assert client.stats["dropped_udp_pending_full"] == 4
    syn, = take(client)
    server.from_sal(syn, 0.0)
    (synack,) = take(server)
    client.from_sal(synack, 0.1)
    ack, *data = take(client)
    assert check_sal(ack)[1].flags == wire.ACK
    assert len(data) == MAX_PENDING
    # the ACK is lost: the first datagram stands in for it
    got = [check_udp(server.from_sal(d, 0.1), SGW_LAN, SERVER)[2] for d in data]
    assert got == [b"d%d" % i for i in range(MAX_PENDING)]


def test_a_repeated_syn_is_answered_again_and_opens_nothing():
    client, server = make_pair()
    client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"x"), 0.0)
    (syn,) = take(client)
    server.from_sal(syn, 0.0)
    server.from_sal(syn, 0.5)
    first, again = take(server)
    assert check_sal(first)[1].control == check_sal(again)[1].control
    assert len(server.flows) == 1


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_idle_flow_ends_with_a_fin_both_ways(carriage):
    client, server = make_pair(timeouts=Timeouts(udp_idle=5.0), carriage=carriage)
    open_flow(client, server)
    client.handle_timer(4.9)
    server.handle_timer(4.0)
    assert not take(client)
    client.handle_timer(5.1)
    (fin,) = take(client)
    assert check_sal(fin)[1].flags == wire.FIN
    assert server.from_sal(fin, 5.1) is None
    ack, server_fin = take(server)                    # ours acknowledged; then its own FIN
    assert check_sal(ack)[1].flags == wire.ACK and check_sal(server_fin)[1].flags == wire.FIN
    client.from_sal(ack, 5.1)
    client.from_sal(server_fin, 5.1)
    (last,) = take(client)
    server.from_sal(last, 5.1)
    assert [f.state for f in client.flows.values()] == [State.CLOSED]
    assert [f.state for f in server.flows.values()] == [State.CLOSED]
    assert client.stats["flows_idle_closed"] == 1
    client.handle_timer(5.1 + Timeouts().linger + 0.1)
    server.handle_timer(5.1 + Timeouts().linger + 0.1)
    assert not client.flows and not server.flows and not client.udp_flows and not server.udp_flows
    # the next datagram opens a new flow
    open_flow(client, server, 20.0)
    assert client.stats["udp_flows_opened"] == 2


def test_traffic_keeps_an_idle_timeout_away():
    client, server = make_pair(timeouts=Timeouts(udp_idle=5.0))
    open_flow(client, server)
    for t in (3.0, 6.0, 9.0):
        client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"k"), t)
        client.handle_timer(t + 0.5)
    assert not take(client) and client.stats["flows_idle_closed"] == 0


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_too_big_for_the_path_gets_frag_needed_never_fragmented(carriage):
    client, server = make_pair(mtu=1500, carriage=carriage)
    open_flow(client, server)
    most = 1488 - (8 if carriage == "udp" else 0)          # the largest legacy packet that fits
    fits = udp_packet(CLIENT, 5353, VIP, 53, b"f" * (most - 28))
    sal = client.from_legacy_udp(fits, 1.0)
    assert len(sal) == 1500 and server.from_sal(sal, 1.0).endswith(b"f" * (most - 28))
    big = udp_packet(CLIENT, 5353, VIP, 53, b"b" * (most + 1 - 28))
    assert client.from_legacy_udp(big, 1.0) is None
    (err,) = take(client)
    parsed = icmp.parse(err)
    assert parsed.frag_needed and parsed.mtu == most
    assert (ntoa(IPv4(err).src), ntoa(IPv4(err).dst)) == (VIP, CLIENT)
    assert client.stats["dropped_udp_too_big"] == 1
    # the same from the backend's side: it hears it from the address it sent to
    bport = next(iter(server.flows.values())).legacy_dport
    assert server.from_backend_udp(udp_packet(SERVER, 5300, SGW_LAN, bport, b"b" * (most + 1 - 28)), 1.0) is None
    (err,) = take(server)
    assert icmp.parse(err).mtu == most and ntoa(IPv4(err).dst) == SERVER


def test_malformed_datagrams_are_dropped_and_counted():
    client, server = make_pair()
    open_flow(client, server)
    good = udp_packet(CLIENT, 5353, VIP, 53, b"hello")
    bad_len = good[:24] + struct.pack("!H", 99) + good[26:]
    assert client.from_legacy_udp(bad_len, 1.0) is None
    assert client.from_legacy_udp(good[:26], 1.0) is None                 # truncated
    frag = good[:6] + b"\x20\x00" + good[8:]
    assert client.from_legacy_udp(frag, 1.0) is None
    assert client.stats["dropped_udp_bad_length"] == 1
    assert client.stats["dropped_udp_truncated"] == 1
    assert client.stats["dropped_fragment"] == 1
    assert not take(client) and client.stats["to_sal"] == 2              # the SYN and first datagram
    # from the peer: a SAL datagram whose UDP length lies
    sal = bytearray(client.from_legacy_udp(good, 1.0))
    sal[36:38] = struct.pack("!H", 200)
    assert server.from_sal(bytes(sal), 1.0) is None
    assert server.stats["dropped_udp_bad_length"] == 1


def test_tcp_beside_udp_on_one_virtual_address():
    client, server = make_pair()
    open_flow(client, server)
    syn = tcp_packet(CLIENT, 40000, VIP, 80, 1, flags=SYN, mss=1460)
    sal = client.from_legacy(syn, 1.0)
    ip, hdr = IPv4(sal), wire.decode(sal, 20)[0]
    assert hdr.protocol == 6 and hdr.flags == wire.SYN
    to_backend = server.from_sal(sal, 1.0)
    assert IPv4(to_backend).protocol == 6 and struct.unpack_from("!H", to_backend, 22)[0] == 8080
    assert len(client.flows) == len(server.flows) == 2 and len(client.udp_flows) == 1


def test_protocol_mismatch_opens_nothing():
    client, server = make_pair()
    client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"x"), 0.0)
    (syn,) = take(client)
    hdr, off = wire.decode(syn, 20)
    hdr.extensions[1].service_id = TCP_SID          # a UDP SYN naming the TCP service
    forged = syn[:20] + hdr.encode() + syn[off:]
    assert server.from_sal(forged, 0.0) is None
    assert server.stats["dropped_wrong_protocol"] == 1 and not server.flows and not take(server)


def test_no_udp_service_is_refused_at_once():
    client, _ = make_pair()
    for port in (80, 54):           # a TCP service's port, and nothing at all
        assert client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, port, b"x"), 0.0) is None
        (err,) = take(client)
        parsed = icmp.parse(err)
        assert (parsed.type, parsed.code) == (icmp.DEST_UNREACH, icmp.PORT_UNREACH)
    assert client.stats["dropped_udp_not_carried"] == 2 and not client.flows


def test_a_server_reset_ends_the_udp_flow_and_the_next_datagram_opens_anew():
    client, server = make_pair()
    bport = open_flow(client, server)
    client.from_sal(server.from_backend_udp(udp_packet(SERVER, 5300, SGW_LAN, bport, b"a"), 0.5), 0.5)
    sflow = next(iter(server.flows.values()))
    rst = sflow.sal.reset()
    server._emit_sal(sflow, rst.encode())
    (pkt,) = take(server)
    assert client.from_sal(pkt, 1.0) is None
    assert not take(client)        # no TCP RST toward a UDP host; no refusal once answers came
    assert [f.state for f in client.flows.values()] == [State.RESET]
    client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"again"), 2.0)
    (syn,) = take(client)
    assert check_sal(syn)[1].flags == wire.SYN and client.stats["udp_flows_opened"] == 2


# --- configuration and the daemon's rules -----------------------------------------------

CLIENT_TOML = '''[gateway]
sal_address = "198.19.2.1"

[[service]]
name = "dns.svc.example"
address = "198.18.0.53"
port = 53
protocol = "udp"

[[service]]
name = "dns.svc.example"
address = "198.18.0.53"
port = 53

[[route]]
service = "dns.svc.example"
next_hop = "198.19.2.2"

[timeouts]
udp_idle = 12
'''

SERVER_TOML = '''[gateway]

[[service]]
name = "dns.svc.example"
port = 53
protocol = "udp"
backend = "198.19.3.2:5300"

[[service]]
name = "web.svc.example"
port = 80
backend = "198.19.3.2:8080"
'''


def test_a_service_declares_its_protocol(tmp_path):
    from gateway.config import load
    (tmp_path / "c.toml").write_text(CLIENT_TOML)
    (tmp_path / "s.toml").write_text(SERVER_TOML)
    ccfg, scfg = load(str(tmp_path / "c.toml"), "client"), load(str(tmp_path / "s.toml"), "server")
    assert [s.protocol for s in ccfg.services] == ["udp", "tcp"]       # one address:port, both transports
    assert [s.protocol for s in scfg.services] == ["udp", "tcp"]
    assert ccfg.timeouts.udp_idle == 12.0 and scfg.timeouts.udp_idle == 30.0


@pytest.mark.parametrize("role, text, line, words", [
    ("server", SERVER_TOML.replace('protocol = "udp"', 'protocol = "sctp"'), 6, 'protocol must be "tcp" or "udp"'),
    ("client", CLIENT_TOML.replace('protocol = "udp"', "protocol = 17"), 8, 'protocol must be "tcp" or "udp"'),
    ("client", CLIENT_TOML.replace("port = 53\n\n[[route]]", 'port = 53\nprotocol = "udp"\n\n[[route]]'),
     10, "198.18.0.53:53 (udp) is configured twice"),
    ("client", CLIENT_TOML.replace("udp_idle = 12", "udp_idle = 0"), 20, "positive number of seconds"),
])
def test_bad_udp_settings_are_refused_with_their_line(tmp_path, role, text, line, words):
    from gateway.config import ConfigError, load
    path = tmp_path / f"{role}.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load(str(path), role)
    assert f"{role}.toml:{line}:" in str(exc.value) and words in str(exc.value)


def test_the_daemon_builds_udp_services_and_queues_their_datagrams(tmp_path):
    from gateway.config import load
    from gateway.daemon import build_translator, interception_plan
    (tmp_path / "c.toml").write_text(CLIENT_TOML)
    (tmp_path / "s.toml").write_text(SERVER_TOML)
    ccfg, scfg = load(str(tmp_path / "c.toml"), "client"), load(str(tmp_path / "s.toml"), "server")
    source = lambda host: ("198.19.3.1", "lan0")              # noqa: E731
    client = build_translator(ccfg, source, {"lan0": 1500})
    server = build_translator(scfg, source, {"lan0": 1500})
    assert client.resolve_udp(aton("198.18.0.53"), 53) == ccfg.services[0].service_id
    assert client.resolve_udp(aton("198.18.0.53"), 54) is None
    assert client.timeouts.udp_idle == 12.0
    backends = [server.table.resolve(s.service_id).target for s in scfg.services]
    assert [(b.port, b.protocol) for b in backends] == [(5300, 17), (8080, 6)]
    plan = interception_plan(scfg, server, ["lan0"], lambda cfg: None)
    udp_rules = [r for r in plan["prerouting"] if "udp" in getattr(r, "match", ())]
    assert [(r.match, r.queue, r.bypass) for r in udp_rules] == [
        (["-p", "udp", "-s", "198.19.3.2", "--sport", "5300", "--dport", "1024:32767"], scfg.queue, False)]
    plan = interception_plan(ccfg, client, ["lan0"], lambda cfg: None)
    assert any(getattr(r, "match", None) == ["-p", "udp", "-d", ccfg.virtual_network] for r in plan["output"])


def test_two_gateways_in_memory_carry_a_datagram_exchange(tmp_path):
    """The daemon's dispatch (Gateway._handle): the client gateway takes a datagram
    toward the virtual range from its queue, the server gateway a backend's reply."""
    from gateway.config import load
    from gateway.daemon import Gateway
    from tests.unit import gateway_fakes as fakes

    def gateway(role, text, net):
        path = tmp_path / f"{role}.toml"
        path.write_text(text.replace("[gateway]\n", f'[gateway]\ncontrol_socket = "{tmp_path}/{role}.sock"\n'
                                     f'state_dir = "{tmp_path}"\n', 1))
        reactor = fakes.Reactor()
        gw = Gateway(load(str(path), role), reactor, fakes.adapters(net, reactor))
        gw.start()
        return gw

    cgw = gateway("client", CLIENT_TOML, fakes.Net({"198.19.2.1": "eth0", "198.19.1.1": "lan0"},
                                                   [("198.19.2.0/24", "198.19.2.1", "eth0"),
                                                    ("198.19.1.0/24", "198.19.1.1", "lan0")], {"eth0", "lan0"}))
    sgw = gateway("server", SERVER_TOML.replace("[gateway]\n", '[gateway]\nsal_address = "198.19.2.2"\n'),
                  fakes.Net({"198.19.2.2": "eth0", "198.19.3.1": "back0"},
                            [("198.19.2.0/24", "198.19.2.2", "eth0"), ("198.19.3.0/24", "198.19.3.1", "back0")],
                            {"eth0", "back0"}))
    try:
        assert cgw.reader.packet(udp_packet(CLIENT, 5353, "198.18.0.53", 53, b"q1")) is None
        syn = cgw.injector.sent.pop()
        assert sgw.control_reader.packet(syn) is None
        assert sgw.injector.sent, (sgw.translator.stats, sgw.translator.flows)
        cgw.control_reader.packet(sgw.injector.sent.pop())              # the SYN-ACK
        ack, data = cgw.injector.sent
        sgw.control_reader.packet(ack)
        to_backend = sgw.reader.packet(data)
        bport, dport, payload = check_udp(to_backend, "198.19.3.1", SERVER)
        assert (dport, payload) == (5300, b"q1")
        reply = sgw.reader.packet(udp_packet(SERVER, 5300, "198.19.3.1", bport, b"a1"))
        assert check_udp(cgw.reader.packet(reply), "198.18.0.53", CLIENT) == (53, 5353, b"a1")
        # no UDP service behind this port: refused at once, as before
        assert cgw.reader.packet(udp_packet(CLIENT, 5353, "198.18.0.53", 54, b"x")) is None
        assert icmp.parse(cgw.injector.sent.pop()).code == icmp.PORT_UNREACH
    finally:
        cgw.stop()
        sgw.stop()


def test_one_name_and_port_over_both_transports_gets_two_service_ids(tmp_path):
    from gateway.config import ConfigError, load
    both = SERVER_TOML + '\n[[service]]\nname = "dns.svc.example"\nport = 53\nbackend = "198.19.3.2:5300"\n'
    (tmp_path / "s.toml").write_text(both)
    udp, _, tcp = load(str(tmp_path / "s.toml"), "server").services
    assert udp.service_id != tcp.service_id and udp.service_id[:28] == tcp.service_id[:28]
    assert tcp.service_id == service_id_for("dns.svc.example", 53)
    # the client derives the same IDs, and its route by name covers both
    (tmp_path / "c.toml").write_text(CLIENT_TOML)
    ccfg = load(str(tmp_path / "c.toml"), "client")
    assert [s.service_id for s in ccfg.services] == [udp.service_id, tcp.service_id]
    assert all(ccfg.rules[0].prefix.matches(s.service_id) for s in ccfg.services)
    # one explicit serviceID for both transports is refused on the server
    explicit = both.replace('protocol = "udp"\n', 'protocol = "udp"\nservice_id = "dns.svc.example:53"\n')
    (tmp_path / "s.toml").write_text(explicit)
    with pytest.raises(ConfigError, match=r"s.toml:\d+: service dns.svc.example: its service_id is also a udp"):
        load(str(tmp_path / "s.toml"), "server")


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_a_udp_flow_through_a_service_router_binds_late(carriage):
    """The router forwards a UDP SYN as it does a TCP one (its rewrite keeps the UDP
    checksum right); the SYN-ACK comes straight back from the instance."""
    from router.core import RouterCore, RouterOptions
    from sal import registration as reg
    import random

    router, sgw = "198.19.20.1", "198.19.30.1"
    key = reg.Key("deployment", bytes(range(32)))
    ctable = ServiceTable()
    ctable.add(ServicePrefix(bytes(32), 0), Action.FORWARD, router)
    client = ClientTranslator(aton(CGW), lambda a, p: None, ctable, make_carriage(carriage, "client"),
                              resolve_udp=lambda a, p: SID)
    stable = ServiceTable()
    stable.add(ServicePrefix(SID), Action.DEMUX, Backend(aton(SERVER), 5300, aton(SGW_LAN), "dns", 17))
    server = ServerTranslator(stable, make_carriage(carriage, "server"))
    r = RouterCore("r0", [key], RouterOptions(address=aton(router)), now=0.0, rng=random.Random(1))
    wall = 1_800_000_000 * 10**9
    msg = reg.Signer(key, "sgw0").message(reg.REGISTER, wall, address=aton(sgw), hold_ms=300,
                                          records=[reg.Record("dns.svc.example", ServicePrefix(SID), 1, 1)])[0]
    r.on_control(msg, 0.0, wall)
    client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"via the router"), 0.0)
    (syn,) = take(client)
    assert ntoa(IPv4(syn).dst) == router
    forwarded = r.on_packet(syn, 0.0)
    assert isinstance(forwarded, bytes) and ntoa(IPv4(forwarded).dst) == sgw
    fip = IPv4(forwarded)
    hdr, off = wire.decode(forwarded, fip.ihl + (0 if carriage == "ip" else 8))
    seg = forwarded[off:]
    pseudo = (fip.src, fip.dst) if carriage == "ip" else (bytes(4), bytes(4))
    assert hdr.protocol == 17 and seg[6:8] != b"\0\0" and transport_checksum_ok(*pseudo, 17, seg)
    assert server.from_sal(forwarded, 0.0) is None
    (synack,) = take(server)
    assert (ntoa(IPv4(synack).src), ntoa(IPv4(synack).dst)) == (sgw, CGW)    # straight back
    client.from_sal(synack, 0.0)
    ack, data = take(client)
    assert ntoa(IPv4(data).dst) == sgw                                        # bound to the instance
    server.from_sal(ack, 0.0)
    assert check_udp(server.from_sal(data, 0.0), SGW_LAN, SERVER)[2] == b"via the router"


def test_the_flows_view_names_a_udp_flow():
    client, server = make_pair()
    open_flow(client, server)
    (row,) = client.flow_rows(1.0)
    assert row["legacy"] == f"{CLIENT}:5353 -> {VIP}:53 udp" and row["state"] == "established"


def test_a_name_and_port_over_both_transports_are_two_services_of_the_table(tmp_path):
    from gateway.config import load
    from gateway.table_owner import config_rules
    both = SERVER_TOML + '\n[[service]]\nname = "dns.svc.example"\nport = 53\nbackend = "198.19.3.2:5300"\n'
    (tmp_path / "s.toml").write_text(both)
    cfg = load(str(tmp_path / "s.toml"), "server")
    rules = config_rules(cfg, lambda host: ("198.19.3.1", "lan0"))
    assert [(r.service, r.target.protocol) for r in rules] == [
        ("dns.svc.example:53/udp", 17), ("web.svc.example:80", 6), ("dns.svc.example:53", 6)]


def test_frag_needed_on_the_path_reaches_the_datagram_sender_and_lowers_the_limit():
    client, server = make_pair()
    open_flow(client, server)
    up = client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"u" * 1400), 1.0)
    mid = aton("198.19.2.254")
    err = icmp.build_error(mid, up[12:16], icmp.DEST_UNREACH, icmp.FRAG_NEEDED, up, 1400)
    assert client.from_icmp(err, 2.0) is None
    (out,) = take(client)
    parsed = icmp.parse(out)
    assert (ntoa(IPv4(out).src), ntoa(IPv4(out).dst)) == (VIP, CLIENT)
    assert parsed.frag_needed and parsed.mtu == 1400 - 12
    q = parsed.quoted
    assert (ntoa(q[12:16]), ntoa(q[16:20]), q[9]) == (CLIENT, VIP, 17)          # what it sent
    assert struct.unpack_from("!HH", q, 20) == (5353, 53)
    # the next datagram too big for the learnt path is refused at the gateway
    assert client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"u" * 1400), 3.0) is None
    assert icmp.parse(take(client)[0]).mtu == 1388
    assert client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"u" * 1360), 3.0) is not None


def test_a_udp_flow_moves_with_the_client_gateway_holding_its_datagrams():
    cgw2 = "198.19.2.9"
    client, server = make_pair()
    bport = open_flow(client, server)
    assert client.migrate(1.0, aton(cgw2)) == 1
    (rsyn,) = take(client)
    ip, hdr, seg = check_sal(rsyn)
    assert ntoa(ip.src) == cgw2 and hdr.flags == wire.RSYN and seg == b""
    assert client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"while moving"), 1.0) is None
    assert server.from_sal(rsyn, 1.0) is None
    (rsynack,) = take(server)
    assert server.from_backend_udp(udp_packet(SERVER, 5300, SGW_LAN, bport, b"held too"), 1.0) is None
    client.from_sal(rsynack, 1.1)
    ack, data = take(client)
    assert check_sal(ack)[1].flags == wire.ACK and ntoa(IPv4(data).src) == cgw2
    server.from_sal(ack, 1.1)
    (released,) = take(server)
    assert ntoa(IPv4(released).dst) == cgw2
    assert check_udp(server.from_sal(data, 1.2), SGW_LAN, SERVER) == (bport, 5300, b"while moving")
    assert check_udp(client.from_sal(released, 1.2), VIP, CLIENT) == (53, 5353, b"held too")


def test_a_datagram_after_the_peer_closed_opens_a_new_flow():
    client, server = make_pair()
    server.timeouts = Timeouts(udp_idle=5.0)
    open_flow(client, server)
    server.handle_timer(5.1)                          # the server gateway ends it first
    (fin,) = take(server)
    client.from_sal(fin, 5.1)
    ack, client_fin = take(client)
    assert check_sal(client_fin)[1].flags == wire.FIN
    # a datagram now must not ride the closing flow (the backend's answer would be lost)
    assert client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"late"), 5.2) is None
    (syn,) = take(client)
    assert check_sal(syn)[1].flags == wire.SYN and client.stats["udp_flows_opened"] == 2


def test_over_the_per_source_cap_a_datagram_is_refused_at_once():
    from gateway.translate.limits import Limits
    client, server = make_pair()
    client.limits = Limits(max_flows_per_source=2)
    open_flow(client, server, sport=1)
    open_flow(client, server, sport=2)                # established: none to evict
    client.from_legacy_udp(udp_packet(CLIENT, 3, VIP, 53, b"x"), 0.0)
    (refusal,) = take(client)
    assert icmp.parse(refusal).code == icmp.PORT_UNREACH
    assert client.stats["limit_flows_per_source"] == 1 and client.stats["refused_flow_cap"] == 1


def test_a_backend_that_refuses_is_told_to_the_client_at_once():
    client, server = make_pair()
    client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"anyone?"), 0.0)
    server.from_sal(take(client)[0], 0.0)
    client.from_sal(take(server)[0], 0.0)
    ack, data = take(client)
    server.from_sal(ack, 0.0)
    to_backend = server.from_sal(data, 0.0)
    # another host's word is not the backend's: only counted
    other = icmp.build_error(aton("198.19.3.77"), to_backend[12:16], icmp.DEST_UNREACH, icmp.PORT_UNREACH,
                             to_backend)
    assert server.from_icmp(other, 0.1) is None and not take(server)
    # the backend's kernel: nobody listens there
    refused = icmp.build_error(aton(SERVER), to_backend[12:16], icmp.DEST_UNREACH, icmp.PORT_UNREACH, to_backend)
    assert server.from_icmp(refused, 0.1) is None
    (rst,) = take(server)
    assert check_sal(rst)[1].flags == wire.RST and server.stats["icmp_udp_backend_refused"] == 1
    assert client.from_sal(rst, 0.1) is None
    (told,) = take(client)
    parsed = icmp.parse(told)
    assert (parsed.type, parsed.code) == (icmp.DEST_UNREACH, icmp.PORT_UNREACH)
    assert (ntoa(IPv4(told).src), ntoa(IPv4(told).dst)) == (VIP, CLIENT)
    q = parsed.quoted
    assert (ntoa(q[12:16]), ntoa(q[16:20]), q[9]) == (CLIENT, VIP, 17)
    assert struct.unpack_from("!HH", q, 20) == (5353, 53)
    # a backend's own datagram toward a host that is not ours passes
    assert server.from_icmp(icmp.build_error(aton(SERVER), aton(SGW_LAN), icmp.DEST_UNREACH, icmp.PORT_UNREACH,
                                             udp_packet(SGW_LAN, 999, SERVER, 5300, b"x")), 0.2) is PASS


def test_a_refusal_after_the_backend_answered_is_only_counted():
    client, server = make_pair()
    bport = open_flow(client, server)
    server.from_backend_udp(udp_packet(SERVER, 5300, SGW_LAN, bport, b"answer"), 0.5)
    to_backend = server.from_sal(client.from_legacy_udp(udp_packet(CLIENT, 5353, VIP, 53, b"q"), 1.0), 1.0)
    refused = icmp.build_error(aton(SERVER), to_backend[12:16], icmp.DEST_UNREACH, icmp.PORT_UNREACH, to_backend)
    assert server.from_icmp(refused, 1.1) is None and not take(server)
    assert server.stats["icmp_soft_errors"] == 1
    assert [f.closed_at for f in server.flows.values()] == [None]
