"""A SYN the router cannot forward is answered at once: ICMP host unreachable (3/1) to the
SYN's source, quoting the SYN exactly as it arrived (RFC 1812: IP header and as much as
fits in 576 bytes, never less than the whole SAL header and 8 bytes after it), over both
carriages, counted by reason, rate-limited by a token bucket. Golden bytes, no I/O."""
import pytest

from gateway.translate.carriage import make_carriage
from router.core import RouterOptions, RouterCore
from router.refusal import TokenBucket, host_unreachable, quote_length
from sal import wire
from sal.checksum import checksum
from sal.ip import IPv4, aton, transport_checksum
from sal.serviceid import ServicePrefix, service_id_for
from sal.service_table import Action
from tests.unit.packets import SYN, tcp_packet
from tests.unit.test_router_core import CGW, KEY, ROUTER, SID, Sender, make_router, record, sal_syn

# the 28 bytes before the quote, checked field by field:
#   45 c0 <total> 0000 4000 40 01 <ip csum> c6131401 (198.19.20.1, the router) c6130a01 (198.19.10.1, the client gateway)
#   03 01 <icmp csum> 00000000
GOLDEN_HEAD = {
    "ip": "45c0008c0000400040018f88c6131401c6130a01" "0301a74600000000",     # quote: 112 bytes
    "udp": "45c000940000400040018f80c6131401c6130a01" "0301544e00000000",    # quote: 120 bytes
}


def syn_with_data(payload: bytes) -> bytes:
    """An IP-carriage SAL SYN whose TCP segment carries ``payload``."""
    seg = bytearray(tcp_packet("198.19.1.2", 40000, "198.18.0.10", 80, 1000, flags=SYN, payload=payload)[20:])
    seg[0:4] = bytes(4)
    seg[16:18] = transport_checksum(aton(CGW), aton(ROUTER), 6, bytes(seg), 16).to_bytes(2, "big")
    hdr = wire.SalHeader(0x77, 0, 6, [wire.Control(wire.SYN, 7, 0, b"n" * 8), wire.Service(SID)])
    return make_carriage("ip", "client").wrap(aton(CGW), aton(ROUTER), hdr.encode() + bytes(seg), 0)


def refused(r, pkt, now=0.0):
    assert r.on_packet(pkt, now) is None, "a refused SYN is dropped"
    out, r.outbox[:] = list(r.outbox), []
    return out


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_no_service_is_answered_with_golden_bytes(carriage):
    r = make_router()
    syn = sal_syn(carriage=carriage)
    [icmp] = refused(r, syn)
    assert icmp[:28].hex() == GOLDEN_HEAD[carriage]
    assert icmp[28:] == syn                         # short: quoted whole, as it arrived
    assert checksum(icmp[:20]) == 0 and checksum(icmp[20:]) == 0
    assert IPv4(icmp).total_length == len(icmp)
    assert (r.stats["dropped_no_service"], r.stats["icmp_unreachable_no_service"]) == (1, 1)


def test_the_quote_holds_the_flow_as_sent_before_any_rewrite():
    """A SYN that already passed a router (SOURCE present) is quoted with its own SOURCE,
    not the one this router would have written; flowID and nonce are where they were."""
    r = make_router()
    syn = sal_syn(flow=0xCAFE0001, extra=[wire.Source([aton("198.19.9.9")])])
    [icmp] = refused(r, syn)
    quoted, end = wire.decode(icmp[28:], 20)
    assert icmp[28:] == syn and quoted.checksum_ok
    assert (quoted.src_flow, quoted.dst_flow, quoted.control.nonce) == (0xCAFE0001, 0, b"n" * 8)
    assert [e.addresses for e in quoted.extensions if isinstance(e, wire.Source)] == [[aton("198.19.9.9")]]


def test_a_long_syn_is_quoted_up_to_576_bytes():
    r = make_router()
    syn = syn_with_data(bytes(range(256)) * 4)           # a SYN with 1024 bytes of data
    [icmp] = refused(r, syn)
    assert len(icmp) == 576 and IPv4(icmp).total_length == 576
    assert icmp[28:] == syn[:548] and checksum(icmp[20:]) == 0


def test_a_sal_header_too_big_for_576_is_still_quoted_whole():
    """SOURCE already at its 62 addresses (no room for our hop) plus a large unknown
    extension: the SAL header alone passes 548 bytes; the quote keeps it and 8 bytes more."""
    r = make_router()
    r.on_control(Sender("sgw0", "198.19.30.1").register(record()), 0.0, 1_800_000_000 * 10**9)
    big = wire.OtherExtension(wire.EXT_ADDRESS, bytes((wire.EXT_ADDRESS << 4, 252)) + bytes(250))
    source = wire.Source([aton(f"198.19.40.{i}") for i in range(62)])
    syn = sal_syn(extra=[source, big])
    sal_end = wire.decode(syn, 20)[1]
    assert sal_end > 548
    [icmp] = refused(r, syn)
    assert icmp[28:] == syn[:sal_end + 8] and len(icmp) == 28 + sal_end + 8
    assert r.stats["icmp_unreachable_no_room_for_source"] == 1


def test_a_full_delay_queue_refuses_at_once():
    r = make_router(max_held=1)
    r.add_rule(ServicePrefix(SID), Action.DELAY, priority=0)
    assert refused(r, sal_syn(flow=1)) == []                   # held
    [icmp] = refused(r, sal_syn(flow=2))
    assert wire.decode(icmp, 48)[0].src_flow == 2 and r.stats["icmp_unreachable_delay_full"] == 1


def test_what_is_not_a_refusal_stays_silent():
    """A DROP rule is the operator's silence; malformed or non-SYN packets are never acted on."""
    r = make_router()
    r.add_rule(ServicePrefix(service_id_for("blocked", 80)), Action.DROP)
    assert refused(r, sal_syn(sid=service_id_for("blocked", 80))) == []
    bad = bytearray(sal_syn())
    bad[30] ^= 0xFF                                           # SAL checksum broken
    assert refused(r, bytes(bad)) == []
    data = make_carriage("ip", "client").wrap(aton(CGW), aton(ROUTER), wire.SalHeader(1, 2, 6, []).encode() + bytes(20), 0)
    assert refused(r, data) == []
    assert not any(k.startswith("icmp_") for k in r.stats), r.stats


def test_refusals_are_rate_limited_by_a_token_bucket():
    r = RouterCore("r0", [KEY], RouterOptions(address=aton(ROUTER), icmp_rate=2.0, icmp_burst=3))
    sent = [len(refused(r, sal_syn(flow=i), 0.0)) for i in range(5)]
    assert sent == [1, 1, 1, 0, 0] and r.stats["icmp_rate_limited"] == 2
    assert r.stats["dropped_no_service"] == 5                # every one counted as refused
    assert [len(refused(r, sal_syn(flow=10 + i), 0.5)) for i in range(2)] == [1, 0]    # 0.5 s: one token
    assert [len(refused(r, sal_syn(flow=20 + i), 10.0)) for i in range(4)] == [1, 1, 1, 0]  # never above burst


def test_token_bucket():
    b = TokenBucket(rate=10.0, burst=2, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [True, True, False]
    assert b.take(0.05) is False and b.take(0.1) is True
    assert TokenBucket(rate=5.0, burst=0).take(100.0) is False     # burst 0: refusals never sent


def test_quote_length():
    assert quote_length(100, 88) == 100
    assert quote_length(2000, 88) == 548
    assert quote_length(2000, 700) == 708
    assert host_unreachable(sal_syn(), 88)[:28].hex() == GOLDEN_HEAD["ip"]
    assert CGW == "198.19.10.1"
