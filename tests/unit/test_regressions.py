"""Regression tests: every crash or broken property the fuzzers found (fuzz/, tests/fuzz/),
with the exact input that showed it.

Translator inputs are scenarios as ``fuzz.translate.Translate`` runs them: (carriage,
keep_client_address, stage the pair is first brought to, [(step, packet or argument,
time)]); replaying one checks every property of the fuzz target (no exception, verdict
bytes/None/PASS, well-formed output with verifying checksums, drops counted, tables
consistent, everything forgotten in the end). The pair is built the same way every time
(fixed seeds), so the flowIDs, nonces and ports inside these bytes are the flows' own.
"""
import functools
import struct

import pytest

from fuzz.translate import Translate, make_pair
from gateway.translate import PASS
from sal.checksum import update16
from sal.ip import clamp_mss, transport_checksum, transport_checksum_ok


@functools.lru_cache(maxsize=1)
def translate_target() -> Translate:
    return Translate()


def replay(inp):
    translate_target().run(inp)


def pair_at(carriage, keep, stage):
    return translate_target().configs[(carriage, keep, stage)].build()


# --- a SAL packet with neither CONTROL nor transport was dropped uncounted ------------
# Fixed in base.py _from_sal_flow: counted as dropped_empty.

EMPTY_DATA_SERVER = ('ip', False, 'data', [
    ('s.sal', bytes.fromhex(
        "45000044d42040004090d5dfc6130201c61302022265b1f5177219d30c06f2b1202400008e1132dad5c2bcfd"
        "bffc1bb384a15b3c5ec0d648311f5e12218ee63000000050"), 0.01),
])

EMPTY_DATA_CLIENT = ('ip', False, 'closing', [
    ('c.sal', bytes.fromhex("45000020adb940004090fc6ac6130202c6130201177219d32265b1f50306f759"), 0.01),
])


@pytest.mark.parametrize("inp", [EMPTY_DATA_SERVER, EMPTY_DATA_CLIENT], ids=["server", "client"])
def test_empty_sal_packet_is_a_counted_drop(inp):
    replay(inp)
    carriage, keep, stage, [(op, pkt, now)] = inp
    client, server = pair_at(carriage, keep, stage)
    t = client if op.startswith("c") else server
    assert t.from_sal(pkt, now) is None and t.stats["dropped_empty"] == 1


# --- MSS clamping ---------------------------------------------------------------------
# An MSS option at an odd offset (after one NOP) straddles two checksum words: the
# incremental update was wrong and the clamped SYN left with a bad TCP checksum. A data
# offset past the segment's end (from a SAL peer or a backend) raised IndexError.
# Fixed in sal/ip.py clamp_mss.

ODD_MSS = ('udp', False, 'data', [
    ('c.legacy', bytes.fromhex(
        "4500006d4900400040066459c6130102c612000a9c40005075a575a7000013ee7002ffff86e4000001020405"
        "b4010101c6aac3473f59e9bef840bc2dea83518cd6ea567fc117648149e731beddd647d930f11587cb31d26a"
        "8e3243eaaddc4f0caaffbd27d9333d31ed249902d6"), 0.01),
])

SYN_OFFSET_PAST_END = ('ip', False, 'synack', [
    ('s.sal', bytes.fromhex(
        "4500006d000140004090a9d6c6130201c61302022265b1f5000000001106557d10148000cd613e3000000000"
        "d8f16adf91b7584a202400008e1132dad5c2bcfdbffc1bb384a15b3c5ec0d648311f5e12218ee63000000050"
        "00000000000003e8000000006002ffff0421000002"), 60.0),
])

SYNACK_OFFSET_PAST_END = ('ip', True, 'synack', [
    ('s.backend', bytes.fromhex("450000286d84400040063c22c6130302c61302011f902710000003f1488f5862b012ffffd3250000"), 1.0),
    ('c.legacy', bytes.fromhex("45000028649140004006480ec6130201c612000a9c41005000001389000013ed5018ffff5d940000"), 1.0),
    ('c.legacy', bytes.fromhex("450000285638400040065766c6130102c612000a9c40005000001388000013ee5011ffff5e9b0000"),
     986.8842788817435),
    ('s.timer', None, 991.9842788817435),
])


@pytest.mark.parametrize("inp", [ODD_MSS, SYN_OFFSET_PAST_END, SYNACK_OFFSET_PAST_END],
                         ids=["odd_offset", "sal_syn_offset_past_end", "backend_synack_offset_past_end"])
def test_mss_clamp_inputs(inp):
    replay(inp)


def _segment(opts: bytes, payload: bytes = b"", offset_words: int | None = None) -> bytearray:
    off = (20 + len(opts)) // 4 if offset_words is None else offset_words
    seg = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, off << 4, 0x02, 65535, 0, 0) + opts + payload
    csum = transport_checksum(b"\1\2\3\4", b"\5\6\7\x08", 6, seg, 16)
    return bytearray(seg[:16] + csum.to_bytes(2, "big") + seg[18:])


@pytest.mark.parametrize("opts", [bytes.fromhex("020405b4"), bytes.fromhex("01020405b4010101"),
                                  bytes.fromhex("0101010101020405b40101")])
def test_clamp_mss_checksum_update_at_any_offset(opts):
    seg = _segment(opts + bytes(-len(opts) % 4))
    old, new = clamp_mss(seg, (seg[12] >> 4) * 4, 1448)
    seg[16:18] = update16(struct.unpack_from("!H", seg, 16)[0], old, new).to_bytes(2, "big")
    assert transport_checksum_ok(b"\1\2\3\4", b"\5\6\7\x08", 6, bytes(seg))
    assert (1448).to_bytes(2, "big") in bytes(seg[20:])


def test_clamp_mss_offset_past_the_end():
    seg = _segment(b"", offset_words=15)            # claims 60 bytes of header, has 20
    assert clamp_mss(seg, 60, 1448) is None


def test_clamp_mss_option_running_past_the_header():
    # NOP NOP then an MSS whose value would be the first payload bytes: left alone
    seg = _segment(bytes.fromhex("01010204"), payload=b"\xff\xff data")
    before = bytes(seg)
    assert clamp_mss(seg, 24, 1448) is None and bytes(seg) == before


# --- SalFlow acted on a control packet it then rejected ------------------------------
# An ACK (here ACK|FIN with a bad verno) in SYN_SENT cleared the outstanding SYN before
# the FIN's check rejected the packet: the SYN was never retransmitted and the legacy
# client's own retransmission was dropped uncounted. Fixed in sal/flow.py receive: the
# packet is judged whole first; only a SYN|ACK answers a SYN.

ACK_IN_SYN_SENT = ('udp', False, 'synack', [
    ('c.sal', bytes.fromhex(
        "45000055cc7640004011ddf7c6130202c6130201c1c7d4340041d9642265b1f52265b1f508062e5f10142400"
        "00000001cd613e315c6e433715ba2bdd00000000000003f0000013895004ffff370b0000f7dce17a88"), 8.1),
    ('c.legacy', bytes.fromhex("4500002c000140004006ad99c6130102c612000a9c400050000003e8000000006002ffff6a7c0000020405b4"),
     8.1),
])


def test_ack_in_syn_sent_changes_nothing():
    replay(ACK_IN_SYN_SENT)
    carriage, keep, stage, [(_, sal, t), (_, legacy_syn, _)] = ACK_IN_SYN_SENT
    client, _ = pair_at(carriage, keep, stage)
    assert client.from_sal(sal, t) is None
    (flow,) = client.flows.values()
    assert flow.sal.outstanding is not None            # the SYN is still retransmitted
    assert client.from_legacy(legacy_syn, t) is not None   # and repeated for the legacy client


def test_fin_with_bad_verno_does_not_ack_our_fin():
    from sal.flow import Rejected, SalFlow, State
    from sal.wire import ACK, FIN, Control, SalHeader
    flow = SalFlow(1, b"n" * 8, 100)
    flow.state, flow.remote_flow, flow.remote_nonce, flow.rcv_nxt = State.ESTABLISHED, 2, b"p" * 8, 500
    flow.close(0.0)
    assert flow.outstanding is not None
    bad = SalHeader(2, 1, 6, [Control(FIN | ACK, 999, flow.snd_nxt, b"p" * 8)])
    with pytest.raises(Rejected):
        flow.receive(bad, 0.1)
    assert flow.outstanding is not None and not flow.fin_acked


# --- packets shorter than an IPv4 header (IndexError in the fast-path tests) -----------
# Fixed by testing the length first (client.py from_legacy, server.py from_backend,
# base.py _data_flow).

SHORT_LEGACY = ('ip', False, 'established', [
    ('c.legacy', bytes.fromhex(""), 7320.0),
])

SHORT_BACKEND = ('ip', False, 'closing', [
    ('s.backend', bytes.fromhex("4500008c00014000"), 0.0),
])

SHORT_SAL = ('ip', False, 'closing', [
    ('c.sal', bytes.fromhex(""), 5.1),
])


@pytest.mark.parametrize("inp", [SHORT_LEGACY, SHORT_BACKEND, SHORT_SAL], ids=["legacy", "backend", "sal"])
def test_packets_shorter_than_a_header(inp):
    replay(inp)


def test_runts_are_dropped_or_passed():
    client, server = pair_at("ip", False, "established")
    for n in range(40):
        runt = bytes((0x45,)) + bytes(n)
        assert client.from_legacy(runt[:n], 0.0) in (None, PASS)
        assert client.from_sal(runt[:n], 0.0) in (None, PASS)
        assert server.from_sal(runt[:n], 0.0) in (None, PASS)
        assert server.from_backend(runt[:n], 0.0) in (None, PASS)


# --- server gateway: packets a flow's numbers did not fit -----------------------------
# A backend packet from the backend's address and port to one of our pool ports but to
# another destination was taken for the flow's (its checksum then broken, its RST ending
# our flow). Fixed in server.py from_backend: the destination must be the flow's.

BACKEND_OTHER_DESTINATION = ('ip', False, 'established', [
    ('s.backend', bytes.fromhex(
        "4500005903f4400040062c41c613030264b2dca21f902710000003e9c6ae00ed7004ffff85670000010204cd"
        "1f010101deef851568c7d00a80d087d9e22f4eb6a6e1c820a44ad8626c74ff88db0f43345cb92ac3eb8c8884"
        "80"), 0.01),
])


def test_backend_packet_to_another_destination_passes():
    replay(BACKEND_OTHER_DESTINATION)
    carriage, keep, stage, [(_, pkt, t)] = BACKEND_OTHER_DESTINATION
    _, server = pair_at(carriage, keep, stage)
    assert server.from_backend(pkt, t) is PASS
    assert [f.closed_at for f in server.flows.values()] == [None]


# A SAL SYN's transport checksum is over the SYN's own addresses; the SYN went to the
# backend with the flow's delta, wrong when those differ: a SOURCE naming another
# address than the IP source, a repeated SYN to another of our addresses. Fixed in
# server.py _syn_to_backend.

SYN_SOURCE_NOT_IP_SOURCE = ('ip', False, 'syn', [
    ('s.sal', bytes.fromhex(
        "450000802bdd400040907de7c6130201c6130202ffffffff000000001406e1181014a0000000000100000000"
        "d8f16adf91b7584a202400008e1132dad5c2bcfdbffc1bb384a15b3c5ec0d648311f5e12218ee63000000050"
        "400c0000ab3550e70b6ae9bc00000000000013ed000013887014ffff1e20000001020405b4010101"), 0.0),
])

REPEATED_SYN_OTHER_ADDRESS = ('ip', False, 'synack', [
    ('s.sal', bytes.fromhex(
        "45000070000140004090a9c9c6130201c613020c2265b1f5000000001106557d10148000cd613e3000000000"
        "d8f16adf91b7584a202400008e1132dad5c2bcfdbffc1bb384a15b3c5ec0d648311f5e12218ee63000000050"
        "00000000000003e8000000006002ffff04170000020405a8"), 1.0),
])


@pytest.mark.parametrize("inp", [SYN_SOURCE_NOT_IP_SOURCE, REPEATED_SYN_OTHER_ADDRESS],
                         ids=["source_extension", "other_local_address"])
def test_syn_checksum_over_its_own_addresses(inp):
    replay(inp)


# --- router: forwarding a SYN ---------------------------------------------------------
# Router inputs are (router adds its own address as a SOURCE hop, [(step, bytes, time)])
# as fuzz.router.Router runs them, against a router with two registered instances.


@functools.lru_cache(maxsize=1)
def router_target():
    from fuzz.router import Router
    return Router()


# Over UDP the forwarded UDP length was the sender's field plus the growth: a field that
# lied gave a wrong length, or (0xfffe) raised struct.error. Fixed in router/rewrite.py:
# the length is the packet's.

ROUTER_UDP_LENGTH_FIELD_WRONG = (False, [
    ('packet', bytes.fromhex(
        "450000788371400040110cdbc6130a01c6131401d434d43500680000d33f8fab000000001106df1710148000"
        "a904cb910000000044c94cfc3e79cd9b20240000cd5c70e09726df6ed847c667ac876c7b40e65b291b9aac43"
        "2f6eea63000000080000000089f14b620000000060ffe51900005b05ddf90f87"), 9.5),
])

ROUTER_UDP_LENGTH_FIELD_HUGE = (False, [
    ('packet', bytes.fromhex(
        "4500007e8c594000401103edc6130a01c6131401d434d435fffe000078cf417d000000001106563610148000"
        "e945a65d0000000057cff50fa876cdc0202400008e1132dad5c2bcfdbffc1bb384a15b3c5ec0d648311f5e12"
        "218ee630000000500000000047f3ac9a000000006002ffff71a80000020405b4e5d5292c22e9"), 6.0),
])


@pytest.mark.parametrize("inp", [ROUTER_UDP_LENGTH_FIELD_WRONG, ROUTER_UDP_LENGTH_FIELD_HUGE],
                         ids=["wrong", "huge"])
def test_router_udp_length_is_the_packets(inp):
    router_target().run(inp)
