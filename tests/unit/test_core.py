"""The protocol core without I/O: serviceIDs, the service table, SAL codec edge cases and
the SalFlow state machine driven by a fake clock (numbers as in the reference captures)."""
import hashlib
import random

import pytest

from sal import wire
from sal.flow import MAX_TRIES, Event, Rejected, SalFlow, State
from sal.ip import aton
from sal.service_table import Action, ServiceTable
from sal.serviceid import (ServiceIDError, ServicePrefix, format_service_id, parse_service_id,
                           service_id_for, short)
from sal.wire import ACK, FIN, RST, SYN, MalformedPacket

HEX = "00004001" + "00" * 28
WEB80, WEB443 = service_id_for("web.svc.example", 80), service_id_for("web.svc.example", 443)

# --- serviceIDs -------------------------------------------------------------------------


def test_hex_and_decimal_forms():
    sid = bytes(range(32))
    assert parse_service_id(sid.hex()) == sid and format_service_id(sid) == sid.hex()
    assert parse_service_id(sid.hex().upper()) == sid
    assert parse_service_id("16385") == bytes.fromhex(HEX)       # first word 0x00004001
    assert parse_service_id(HEX) == parse_service_id(" 16385 ")
    assert short(bytes.fromhex(HEX)) == "16385" and short(sid) == sid.hex()[:16] + "…"


def test_name_port_derivation_shares_a_224_bit_prefix():
    digest = hashlib.sha256(b"serval:web.svc.example").digest()
    assert WEB80 == digest[:28] + b"\0\0\x00\x50"
    assert WEB443[:28] == WEB80[:28] and WEB443[28:] == b"\0\0\x01\xbb"
    assert service_id_for("Web.Svc.Example.", 80) == WEB80           # case and root dot
    assert parse_service_id("web.svc.example:80") == WEB80
    host = ServicePrefix(WEB80, 224)
    assert host.matches(WEB443) and not host.matches(service_id_for("other.example", 80))
    assert not ServicePrefix(WEB80).matches(WEB443)


def test_prefix_parse():
    p = ServicePrefix.parse("16385:32")
    assert p.bits == 32 and p.value == 0x4001 << 224
    assert p.matches(parse_service_id("16385")) and not p.matches(parse_service_id("16384"))
    # 16385 is 0x00004001: its first 16 bits are zero, so a /16 covers 16384 too
    assert ServicePrefix.parse("16385:16").matches(parse_service_id("16384"))
    assert ServicePrefix.parse(WEB80.hex() + ":224") == ServicePrefix(WEB443, 224)
    assert ServicePrefix.parse("web.svc.example:80:224") == ServicePrefix(WEB80, 224)
    assert ServicePrefix.parse("web.svc.example:80") == ServicePrefix(WEB80, 256)
    assert ServicePrefix.parse(HEX).bits == 256
    # bits beyond the prefix are dropped, so str() shows the canonical prefix
    assert str(ServicePrefix(b"\xff" * 32, 12)) == "fff" + "0" * 61 + ":12"
    assert ServicePrefix.parse("0:0").matches(WEB80)


@pytest.mark.parametrize("text", ["", "xyz", "4294967296", HEX[:-1], "cafe:80", "name:port"])
def test_bad_service_ids(text):
    with pytest.raises(ServiceIDError):
        parse_service_id(text)


def test_bad_derivations_and_prefixes():
    with pytest.raises(ServiceIDError):
        service_id_for(" . ", 80)
    with pytest.raises(ServiceIDError):
        service_id_for("web", 65536)
    with pytest.raises(ServiceIDError):
        ServicePrefix(WEB80, 257)
    with pytest.raises(ServiceIDError):
        ServicePrefix(b"short", 8)
    with pytest.raises(ServiceIDError):
        ServicePrefix.parse("16385:300")

# --- service table ----------------------------------------------------------------------


def test_longest_prefix_wins():
    t = ServiceTable()
    assert t.resolve(WEB80) is None
    t.add(ServicePrefix(WEB80, 0), Action.FORWARD, "198.19.0.255")
    t.add(ServicePrefix(WEB80, 224), Action.FORWARD, "198.19.0.9")
    t.add(ServicePrefix(WEB80), Action.DEMUX, "backend")
    assert t.resolve(WEB80).target == "backend"
    assert t.resolve(WEB443).target == "198.19.0.9"
    assert t.resolve(service_id_for("other.example", 80)).target == "198.19.0.255"
    assert [e.prefix.bits for e in t.entries()] == [256, 224, 0]


def test_higher_priority_wins():
    t = ServiceTable(random.Random(7))
    t.add(ServicePrefix(WEB80), Action.FORWARD, "low", priority=1, weight=100)
    t.add(ServicePrefix(WEB80), Action.FORWARD, "high", priority=2, weight=1)
    assert {t.resolve(WEB80).target for _ in range(200)} == {"high"}


def test_weighted_choice():
    t = ServiceTable(random.Random(1))
    a = t.add(ServicePrefix(WEB80), Action.FORWARD, "a", weight=1)
    b = t.add(ServicePrefix(WEB80), Action.FORWARD, "b", weight=3)
    draws = [t.resolve(WEB80).target for _ in range(4000)]
    # "b" is a binomial count: n=4000, p=3/4, mean 3000, sd sqrt(n p (1-p)) = 27.4.
    # 4 sd (110) is a miss with probability < 1e-4 for any seed; an unweighted or
    # inverted choice (2000 or 1000) lies 30+ sd away.
    assert abs(draws.count("b") - 3000) < 110
    assert (a.hits, b.hits) == (draws.count("a"), draws.count("b"))


def test_drop_and_delay_actions():
    t = ServiceTable()
    t.add(ServicePrefix(WEB80, 224), Action.DROP)
    t.add(ServicePrefix(WEB80), Action.DELAY)
    assert t.resolve(WEB80).action is Action.DELAY
    assert t.resolve(WEB443).action is Action.DROP and t.resolve(WEB443).target is None
    with pytest.raises(ValueError):
        t.add(ServicePrefix(WEB80), Action.FORWARD, "x", weight=0)


def test_remove():
    t = ServiceTable(random.Random(3))
    exact, host = ServicePrefix(WEB80), ServicePrefix(WEB80, 224)
    t.add(host, Action.FORWARD, "router")
    t.add(exact, Action.FORWARD, "a")
    t.add(exact, Action.FORWARD, "b")
    assert t.remove(exact, "a") == 1
    assert {t.resolve(WEB80).target for _ in range(50)} == {"b"}
    assert t.remove(exact, "nobody") == 0
    assert t.remove(exact) == 1
    assert t.resolve(WEB80).target == "router"              # falls back to the shorter prefix
    assert t.remove(exact) == 0
    assert [e.prefix for e in t.entries()] == [host]

# --- SAL codec edge cases -------------------------------------------------------------

# The SAL header of the SYN in tcp_basic.pcap, as the reference stack sent it.
REF_SYN = bytes.fromhex("00000003000000001106bb55101480001256ec690000000037992e84e4e9f99f"
                        "2024000000004001" + "00" * 28)
NONCE = bytes.fromhex("37992e84e4e9f99f")


def test_reference_syn_golden_bytes():
    hdr, end = wire.decode(REF_SYN + b"TCP")
    assert end == 68 and hdr.checksum_ok and hdr.checksum == 0xBB55
    assert (hdr.src_flow, hdr.dst_flow, hdr.protocol) == (3, 0, 6)
    assert hdr.control == wire.Control(SYN, 307686505, 0, NONCE)
    assert hdr.service.service_id == parse_service_id("16385")
    assert hdr.encode() == REF_SYN
    rebuilt = wire.SalHeader(3, 0, 6, [wire.Control(SYN, 307686505, 0, NONCE),
                                       wire.Service(parse_service_id("16385"))])
    assert rebuilt.encode() == REF_SYN
    assert wire.base_header(3, 3) == bytes.fromhex("00000003000000030306fcf3")  # a data packet's


def test_bad_checksum_is_reported_not_raised():
    corrupt = REF_SYN[:20] + b"\xff" + REF_SYN[21:]
    hdr, _ = wire.decode(corrupt)
    assert not hdr.checksum_ok and hdr.control.ackno == 0xFF000000   # byte 20: ackno


def roundtrip(exts, offset=b""):
    raw = wire.SalHeader(1, 2, 6, exts).encode()
    hdr, end = wire.decode(offset + raw + b"payload", len(offset))
    assert end == len(offset) + len(raw) and hdr.checksum_ok and hdr.encode() == raw
    return raw, hdr


def test_pad():
    raw, hdr = roundtrip([wire.Control(FIN, 1, 2, NONCE)] + [wire.Pad()] * 4, offset=b"\xaa" * 20)
    assert raw[8] == 9 and raw[-4:] == bytes(4)
    assert [type(e) for e in hdr.extensions] == [wire.Control] + [wire.Pad] * 4
    with pytest.raises(ValueError):
        wire.SalHeader(1, 2, 6, [wire.Pad()]).encode()          # not a whole word


def test_source():
    addrs = [aton("198.19.0.1"), aton("198.19.5.5")]
    raw, hdr = roundtrip([wire.Source(addrs)])
    assert raw[12:16] == b"\x40\x0c\x00\x00" and hdr.source.addresses == addrs


def test_unknown_extension_kept_raw():
    ext = bytes([0x50, 8]) + b"future"
    addr = bytes([0x30, 12, 0, 0]) + bytes(8)                 # ADDRESS: defined, never sent
    raw, hdr = roundtrip([wire.OtherExtension(5, ext), wire.OtherExtension(3, addr)])
    assert hdr.extensions == [wire.OtherExtension(5, ext), wire.OtherExtension(3, addr)]


def test_ten_extensions_ok_more_rejected():
    ten = [wire.Control(ACK, 1, 2, NONCE), wire.Service(WEB80)] + [wire.Pad()] * 8
    roundtrip(ten)
    eleven = ten[:2] + [wire.Source([aton("198.19.0.1")])] + ten[2:]   # still whole words
    raw = wire.SalHeader(1, 2, 6, eleven).encode()
    with pytest.raises(MalformedPacket) as exc:
        wire.decode(raw)
    assert exc.value.reason == "sal_too_many_extensions"


@pytest.mark.parametrize("buf, reason", [
    (REF_SYN[:11], "sal_truncated"),                          # shorter than the base header
    (REF_SYN[:40], "sal_truncated"),                          # header claims 68 bytes
    (REF_SYN[:8] + b"\x02" + REF_SYN[9:], "sal_bad_length"),  # 2 words < base header
    (REF_SYN[:8] + b"\x00" + REF_SYN[9:], "sal_bad_length"),
    (REF_SYN[:13] + b"\x13" + REF_SYN[14:], "sal_bad_extension"),   # CONTROL of 19 bytes
    (REF_SYN[:13] + b"\x01" + REF_SYN[14:], "sal_bad_extension"),   # length below 2
    (REF_SYN[:33] + b"\x30" + REF_SYN[34:], "sal_bad_extension"),   # SERVICE of 48 bytes
    (bytes.fromhex("00000001000000020406000040040000"), "sal_bad_extension"),  # empty SOURCE
])
def test_malformed(buf, reason):
    with pytest.raises(MalformedPacket) as exc:
        wire.decode(buf)
    assert exc.value.reason == reason


def test_decode_at_offset_sees_only_what_follows():
    with pytest.raises(MalformedPacket):
        wire.decode(b"\0" * 20 + REF_SYN[:60], 20)

# --- SalFlow state machine, fake clock -------------------------------------------------

A, B = 307686505, 3902956114          # the initial numbers in tcp_basic.pcap
CN, SN = b"client-n", b"server-n"


def wire_trip(hdr: wire.SalHeader) -> wire.SalHeader:
    """What the peer sees: the header through the codec."""
    decoded, _ = wire.decode(hdr.encode())
    assert decoded.checksum_ok
    return decoded


def numbers(hdr):
    return hdr.flags, hdr.control.verno, hdr.control.ackno


def handshake(a=A, b=B):
    client, server = SalFlow(11, CN, a), SalFlow(22, SN, b)
    syn = wire_trip(client.connect(WEB80, b"tcp-syn", now=0.0))
    server.accept(syn)
    synack = wire_trip(server.syn_ack(b"tcp-synack", now=0.1))
    assert client.receive(synack, 0.2) == ([Event.ESTABLISHED], [])
    ack = wire_trip(client.handshake_ack())
    assert server.receive(ack, 0.3) == ([Event.ESTABLISHED], [])
    return client, server, syn, synack, ack


def test_handshake_numbering_matches_capture_rules():
    client, server, syn, synack, ack = handshake()
    assert numbers(syn) == (SYN, A, 0) and syn.dst_flow == 0 and syn.service.service_id == WEB80
    assert numbers(synack) == (SYN | ACK, B, A + 1) and synack.service is None
    assert (synack.src_flow, synack.dst_flow) == (22, 11)
    assert numbers(ack) == (ACK, A + 1, B + 1) and ack.service.service_id == WEB80
    assert (ack.src_flow, ack.dst_flow) == (11, 22)
    assert syn.control.nonce == ack.control.nonce == CN and synack.control.nonce == SN
    assert client.state == server.state == State.ESTABLISHED
    assert client.next_deadline() is None and server.next_deadline() is None


def test_handshake_numbers_wrap_at_32_bits():
    _, _, syn, synack, ack = handshake(a=0xFFFFFFFF, b=0xFFFFFFFF)
    assert numbers(synack)[2] == 0 and numbers(ack)[1:] == (0, 0)


def test_syn_ack_with_wrong_ackno_rejected():
    client = SalFlow(11, CN, A)
    client.connect(WEB80, b"", 0.0)
    bogus = wire.SalHeader(22, 11, 6, [wire.Control(SYN | ACK, B, A, SN)])
    with pytest.raises(Rejected) as exc:
        client.receive(bogus, 0.1)
    assert exc.value.reason == "bad_ackno" and client.state == State.SYN_SENT


def test_fin_both_directions_reaches_closed():
    client, server, *_ = handshake()
    fin = wire_trip(server.close(1.0))
    assert numbers(fin) == (FIN, B + 1, A + 1) and server.next_deadline() == 4.0
    events, out = client.receive(fin, 1.1)
    assert events == [Event.PEER_FIN] and [numbers(h) for h in out] == [(ACK, A + 1, B + 2)]
    assert server.receive(wire_trip(out[0]), 1.2) == ([Event.FIN_ACKED], [])
    assert server.next_deadline() is None and server.state == State.ESTABLISHED
    fin2 = wire_trip(client.close(2.0))
    assert numbers(fin2) == (FIN, A + 1, B + 2)
    events, out = server.receive(fin2, 2.1)
    assert events == [Event.PEER_FIN, Event.CLOSED] and [numbers(h) for h in out] == [(ACK, B + 2, A + 2)]
    assert client.receive(wire_trip(out[0]), 2.2) == ([Event.FIN_ACKED, Event.CLOSED], [])
    assert client.state == server.state == State.CLOSED
    assert client.close(3.0) is None and server.close(3.0) is None


def test_repeated_fin_is_reacknowledged():
    client, server, *_ = handshake()
    fin = wire_trip(server.close(1.0))
    _, first = client.receive(fin, 1.1)
    # the ACK was lost: the server retransmits the same FIN after its RTO
    events, resend = server.handle_timer(4.0)
    assert events == [] and [numbers(h) for h, _ in resend] == [numbers(fin)] and resend[0][1] == b""
    events, again = client.receive(wire_trip(resend[0][0]), 4.1)
    assert events == [] and [numbers(h) for h in again] == [numbers(h) for h in first]
    assert server.receive(wire_trip(again[0]), 4.2) == ([Event.FIN_ACKED], [])


def test_wrong_nonce_rejected():
    client, server, *_ = handshake()
    fin = server.close(1.0)
    fin.control.nonce = b"attacker"
    with pytest.raises(Rejected) as exc:
        client.receive(wire_trip(fin), 1.1)
    assert exc.value.reason == "bad_nonce"
    assert client.state == State.ESTABLISHED and not client.peer_fin and client.rcv_nxt == B + 1


def test_rst_needs_the_right_nonce():
    client, server, *_ = handshake()
    forged = wire.SalHeader(22, 11, 6, [wire.Control(RST, B + 1, A + 1, b"attacker")])
    with pytest.raises(Rejected) as exc:
        client.receive(forged, 1.0)
    assert exc.value.reason == "bad_nonce" and client.state == State.ESTABLISHED
    rst = wire_trip(server.reset())
    assert numbers(rst) == (RST, B + 1, A + 1) and server.state == State.RESET
    assert client.receive(rst, 1.1) == ([Event.RESET], []) and client.state == State.RESET


def test_rst_from_peer_path_without_nonce():
    client, *_ = handshake()
    lost_state = wire.SalHeader(22, 11, 6, [wire.Control(RST, 0, 0, bytes(8))])
    assert client.receive(lost_state, 1.0, on_path=True) == ([Event.RESET], [])


def test_retransmission_schedule_and_give_up():
    client = SalFlow(11, CN, A)
    syn = client.connect(WEB80, b"tcp-syn", now=0.0)
    assert client.next_deadline() == 3.0 and client.handle_timer(2.99) == ([], [])
    sent, now = [], 0.0
    while True:
        now = client.next_deadline()
        events, out = client.handle_timer(now)
        if events:
            break
        assert out == [(syn, b"tcp-syn")]                     # complete, identical packet
        sent.append(now)
    gaps = [t - s for s, t in zip([0.0] + sent, sent)]
    assert gaps == [3, 6, 12, 24, 48, 96] + [120] * 8       # doubling, capped at 120 s
    assert len(sent) + 1 == MAX_TRIES == 15                  # 15 transmissions in all
    assert (events, now) == ([Event.FAILED], sent[-1] + 120)
    assert client.state == State.FAILED and client.next_deadline() is None


def test_syn_ack_retransmitted_until_acked():
    server = SalFlow(22, SN, B)
    server.accept(wire_trip(SalFlow(11, CN, A).connect(WEB80, b"", 0.0)))
    synack = server.syn_ack(b"seg", 10.0)
    assert server.handle_timer(13.0) == ([], [(synack, b"seg")]) and server.next_deadline() == 19.0
    again = server.syn_ack(b"seg2", 14.0)                     # backend repeats its SYN-ACK
    assert numbers(again) == numbers(synack) and server.outstanding.transport == b"seg2"


def test_fin_waits_for_outstanding_syn_ack():
    server = SalFlow(22, SN, B)
    client = SalFlow(11, CN, A)
    server.accept(wire_trip(client.connect(WEB80, b"", 0.0)))
    client.receive(wire_trip(server.syn_ack(b"", 0.1)), 0.2)
    assert server.close(0.5) is None                          # SYN|ACK still outstanding
    assert server.take_pending(0.6) is None and server.fin_pending
    assert server.receive(wire_trip(client.handshake_ack()), 1.0) == ([Event.ESTABLISHED], [])
    fin = server.take_pending(2.0)
    assert numbers(fin) == (FIN, B + 1, A + 1) and server.next_deadline() == 5.0
    assert server.take_pending(2.5) is None and server.close(2.5) is None
