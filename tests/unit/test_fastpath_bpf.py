"""The kernel fast path against its oracle, the Python translator.

Flows are set up between a ClientTranslator and a ServerTranslator in memory, entered
into the program's maps as the gateway enters them, and then every generated packet
goes both ways: through the translator, and through the loaded tc program with
BPF_PROG_TEST_RUN. The bytes must be the same; what the program does not own must come
out untouched, for the slow path.
"""
import os
import struct

import pytest

from tests.unit.packets import ACK, FIN, PSH, RST, SYN, tcp_packet
from tests.unit.test_translate import CGW, CLIENT, SERVER, SGW, SGW_LAN, VIP, handshake, make_pair

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extra: pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gateway.fastpath import maps  # noqa: E402
from sal.ip import aton, transport_checksum  # noqa: E402
from gateway.translate.carriage import ip_header  # noqa: E402

ETH = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00"
TC_ACT_OK, TC_ACT_UNSPEC = 0, 0xFFFFFFFF
MARK = 0x5E7A1
URG, ECE, CWR = 0x20, 0x40, 0x80


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loading BPF programs)"
    from gateway.fastpath import build, libbpf
    try:
        libbpf.lib()
        build.object_path("/tmp/serval-test-bpf")
    except (OSError, build.BuildError) as exc:
        return f"the fast path cannot be built here: {exc}"
    return None


@pytest.fixture(scope="module")
def kernel():
    reason = _unavailable()
    if reason:
        if os.environ.get("SERVAL_REQUIRE_FASTPATH"):
            pytest.fail(f"SERVAL_REQUIRE_FASTPATH is set but {reason}")
        pytest.skip(reason)
    from gateway.fastpath import build
    from gateway.fastpath.libbpf import BpfObject, Map
    from gateway.fastpath.libbpf import prog_map_ids
    obj = BpfObject(str(build.object_path("/tmp/serval-test-bpf")))
    k = Kernel(obj.program_fd("serval_ingress"), Map(obj.map_fd("serval_flows"), 4, maps.FLOW.size),
               Map(obj.map_fd("serval_legacy"), maps.LEGACY_KEY.size, 4),
               Map(obj.map_fd("serval_config"), 4, maps.CONFIG.size))
    k.map_ids = set(prog_map_ids(k.prog))
    yield k
    obj.close()


class Kernel:
    def __init__(self, prog, flows, legacy, config):
        self.prog, self.flows, self.legacy, self.config = prog, flows, legacy, config

    def install(self, translator, flow):
        key = maps.FLOW_KEY.pack(flow.sal.local_flow)
        self.flows.update(key, maps.flow_value(flow, translator.carriage))
        self.legacy.update(maps.legacy_key(flow), key)

    def run(self, translator, packet: bytes) -> tuple[int, bytes]:
        from gateway.fastpath.libbpf import test_run
        self.config.update(b"\0\0\0\0", maps.config_value(MARK, translator.carriage))
        verdict, out = test_run(self.prog, ETH + packet)
        assert out[:14] == ETH
        return verdict, out[14:]

    def counters(self, flow):
        return maps.KernelCounters(self.flows.lookup(maps.FLOW_KEY.pack(flow.sal.local_flow)))


def established(kernel, carriage, cport):
    client, server = make_pair(carriage)
    lport = handshake(client, server, 0.0, carriage, cport)
    (cflow,), (sflow,) = client.flows.values(), server.flows.values()
    # the client's first data segment carries the handshake ACK; after it, plain data
    data = tcp_packet(CLIENT, cport, VIP, 80, 1001, 5001, ACK | PSH, b"x")
    server.from_sal(client.from_legacy(data, 0.0), 0.0)
    for t, f in ((client, cflow), (server, sflow)):
        kernel.install(t, f)
    return client, server, lport


def segment(src, sport, dst, dport, seq, ack, flags, payload, tos=0, ttl=64, ident=1, df=True,
            options=b""):
    off = (20 + len(options)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, 65535, 0, 0) + options + payload
    s, d = aton(src), aton(dst)
    seg = seg[:16] + transport_checksum(s, d, 6, seg, 16).to_bytes(2, "big") + seg[18:]
    return ip_header(s, d, 6, 20 + len(seg), ident, ttl, tos, 0x4000 if df else 0) + seg


packet_fields = st.fixed_dictionaries({
    "seq": st.integers(0, 2**32 - 1), "ack": st.integers(0, 2**32 - 1),
    "flags": st.sampled_from([ACK, ACK | PSH, ACK | URG, ACK | ECE, ACK | CWR, PSH, 0]),
    "payload": st.one_of(st.just(b""), st.binary(min_size=1, max_size=1400)),
    "tos": st.integers(0, 255), "ttl": st.integers(1, 255), "ident": st.integers(0, 65535),
    "df": st.booleans(),
    "options": st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(range(8)), b"\x01" * 4]),
})

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def same(kernel, translator, packet):
    expected = translator.from_legacy(packet, 1.0) if translator.role == "client" and packet[9] == 6 else (
        translator.from_backend(packet, 1.0) if packet[9] == 6 else translator.from_sal(packet, 1.0))
    verdict, out = kernel.run(translator, packet)
    assert verdict == TC_ACT_OK
    assert isinstance(expected, bytes), "the oracle translates it"
    assert out == expected


@pytest.mark.parametrize("carriage", ["ip", "udp"])
@SETTINGS
@given(fields=packet_fields)
def test_both_directions_both_roles_match_the_translator(kernel, carriage, fields):
    client, server, lport = established(kernel, carriage, 41000)
    # client: legacy -> SAL, then the server turns the kernel's bytes back into TCP
    up = segment(CLIENT, 41000, VIP, 80, **fields)
    same(kernel, client, up)
    # server: backend -> SAL (its own direction), and SAL -> backend
    down = segment(SERVER, 8080, SGW_LAN, lport, **fields)
    sal_down = server.from_backend(down, 1.0)
    verdict, out = kernel.run(server, down)
    assert verdict == TC_ACT_OK and out == sal_down
    same(kernel, client, sal_down)                     # client: SAL -> legacy
    sal_up = client.from_legacy(up, 1.0)
    same(kernel, server, sal_up)                       # server: SAL -> backend


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_counters_and_last_ack_are_kept_in_the_map(kernel, carriage):
    client, server, _ = established(kernel, carriage, 41001)
    (cflow,) = client.flows.values()
    for i in range(3):
        pkt = segment(CLIENT, 41001, VIP, 80, 2000 + i * 100, 7777 + i, ACK | PSH, b"y" * 100)
        assert kernel.run(client, pkt)[0] == TC_ACT_OK
    c = kernel.counters(cflow)
    assert (c.packets_out, c.bytes_out, c.legacy_last_ack) == (3, 3 * 120, 7779)
    assert c.packets_in == 0 and c.last_seen > 0 and not c.flags & maps.FLOW_SLOW


def passes(kernel, translator, packet):
    verdict, out = kernel.run(translator, packet)
    assert verdict == TC_ACT_UNSPEC and out == packet, "left for the slow path, unchanged"


@pytest.mark.parametrize("carriage", ["ip", "udp"])
@pytest.mark.parametrize("flag", [FIN, RST])
def test_fin_and_rst_go_up_and_hand_the_flow_back(kernel, carriage, flag):
    client, server, lport = established(kernel, carriage, 41002)
    (cflow,) = client.flows.values()
    passes(kernel, client, segment(CLIENT, 41002, VIP, 80, 3000, 5001, ACK | flag, b""))
    assert kernel.counters(cflow).flags & maps.FLOW_SLOW
    # from now on both directions are Python's
    passes(kernel, client, segment(CLIENT, 41002, VIP, 80, 3001, 5001, ACK, b"late"))
    sal = server.from_backend(segment(SERVER, 8080, SGW_LAN, lport, 5001, 3001, ACK, b"z"), 1.0)
    passes(kernel, client, sal)


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_what_the_program_does_not_own_passes_unchanged(kernel, carriage):
    client, server, lport = established(kernel, carriage, 41003)
    data = segment(CLIENT, 41003, VIP, 80, 4000, 5001, ACK, b"abc")
    # a repeated SYN goes up, and the flow stays in the kernel
    passes(kernel, client, segment(CLIENT, 41003, VIP, 80, 1000, 0, SYN, b""))
    (cflow,) = client.flows.values()
    assert not kernel.counters(cflow).flags & maps.FLOW_SLOW
    # an unknown flow, IP options, a fragment
    passes(kernel, client, segment(CLIENT, 41999, VIP, 80, 4000, 5001, ACK, b"abc"))
    with_options = bytearray(data[:20] + b"\x01\x01\x01\x00" + data[20:])
    with_options[0], with_options[2:4] = 0x46, struct.pack("!H", len(with_options))
    passes(kernel, client, bytes(with_options))
    fragment = bytearray(data)
    fragment[6] = 0x20            # MF
    passes(kernel, client, bytes(fragment))
    # SAL: a control packet, another peer, someone else's header
    sal = server.from_backend(segment(SERVER, 8080, SGW_LAN, lport, 5001, 4000, ACK, b"q"), 1.0)
    at = 20 if carriage == "ip" else 28
    from sal import wire
    (sflow,) = server.flows.values()
    ctl = wire.SalHeader(sflow.sal.local_flow, sflow.sal.remote_flow, 6,
                         [wire.Control(wire.ACK, 1, 1, b"\0" * 8)]).encode()
    passes(kernel, client, sal[:at] + ctl + sal[at + 12:])
    moved = bytearray(sal)
    moved[12:16] = aton("198.19.9.9")
    passes(kernel, client, bytes(moved))
    other = bytearray(sal)
    other[at + 4] ^= 0xFF         # a flowID of no kernel flow
    passes(kernel, client, bytes(other))
    # and what the program owns still goes through
    same(kernel, client, data)


def test_the_server_role_and_the_client_role_agree_on_a_whole_exchange(kernel):
    """Kernel on both gateways: client legacy -> kernel(cgw) -> kernel(sgw) -> backend, equal
    to the Python pair end to end."""
    client, server, lport = established(kernel, "ip", 41004)
    up = segment(CLIENT, 41004, VIP, 80, 9000, 5001, ACK | PSH, b"hello")
    _, k_sal = kernel.run(client, up)
    _, k_backend = kernel.run(server, k_sal)
    assert k_backend == server.from_sal(client.from_legacy(up, 1.0), 1.0)
    assert k_backend[12:16] == aton(SGW_LAN) and k_backend[16:20] == aton(SERVER)
    assert aton(CGW) != aton(SGW)   # the pair's addresses are distinct


def test_a_kernel_flow_costs_at_most_256_bytes(kernel):
    from bench.memory import kernel_bytes_per_flow
    assert kernel_bytes_per_flow(kernel.flows, kernel.legacy, kernel.map_ids) <= 256


# --- UDP flows (gateway/translate/udp.py is the oracle) ---------------------------------

from tests.unit import test_udp_flows as U  # noqa: E402
from gateway.fastpath.manager import FastPath  # noqa: E402
from gateway.translate import Timeouts  # noqa: E402
from sal.checksum import apply_delta  # noqa: E402

UDP_LIMIT = {"ip": 1500 - 20 - 12, "udp": 1500 - 20 - 12 - 8}   # the longest datagram (UDP header + payload)


def install_udp(kernel, translator, flow):
    key = maps.FLOW_KEY.pack(flow.sal.local_flow)
    kernel.flows.update(key, maps.flow_value(flow, translator.carriage, maps.udp_max(translator, flow)))
    kernel.legacy.update(maps.legacy_key(flow), key)


def udp_established(kernel, carriage, sport, now=0.0, timeouts=None):
    """A UDP flow through the pair, answered once by the backend, in the kernel of both
    gateways: (client, server, the server's port toward the backend)."""
    client, server = U.make_pair(carriage=carriage, timeouts=timeouts)
    bport = U.open_flow(client, server, now, sport=sport)
    answer = server.from_backend_udp(U.udp_packet(U.SERVER, 5300, U.SGW_LAN, bport, b"first"), now)
    client.from_sal(answer, now)
    (cflow,), (sflow,) = client.flows.values(), server.flows.values()
    for t, f in ((client, cflow), (server, sflow)):
        install_udp(kernel, t, f)
    return client, server, bport


def datagram(src, sport, dst, dport, payload, checksum=True, tos=0, ttl=64, ident=1, df=True):
    pkt = bytearray(U.udp_packet(src, sport, dst, dport, payload, ident, checksum))
    pkt[1], pkt[8] = tos, ttl
    pkt[6:8] = struct.pack("!H", 0x4000 if df else 0)
    pkt[10:12] = b"\0\0"
    pkt[10:12] = ip_header(pkt[12:16], pkt[16:20], 17, len(pkt), ident, ttl, tos, 0x4000 if df else 0)[10:12]
    return bytes(pkt)


datagram_fields = st.fixed_dictionaries({
    "payload": st.one_of(st.just(b""), st.binary(min_size=1, max_size=1400)),
    "checksum": st.booleans(),
    "tos": st.integers(0, 255), "ttl": st.integers(1, 255), "ident": st.integers(0, 65535),
    "df": st.booleans(),
})


def translated(kernel, translator, packet, oracle):
    expected = oracle(packet, 1.0)
    verdict, out = kernel.run(translator, packet)
    assert isinstance(expected, bytes), "the oracle translates it"
    assert verdict == TC_ACT_OK
    assert out == expected
    return out


@pytest.mark.parametrize("carriage", ["ip", "udp"])
@SETTINGS
@given(fields=datagram_fields)
def test_udp_datagrams_both_directions_both_roles_match_the_translator(kernel, carriage, fields):
    client, server, bport = udp_established(kernel, carriage, 5353)
    up = datagram(U.CLIENT, 5353, U.VIP, 53, **fields)
    sal_up = translated(kernel, client, up, client.from_legacy_udp)          # client: legacy -> SAL
    translated(kernel, server, sal_up, server.from_sal)                      # server: SAL -> backend
    down = datagram(U.SERVER, 5300, U.SGW_LAN, bport, **fields)
    sal_down = translated(kernel, server, down, server.from_backend_udp)     # server: backend -> SAL
    got = translated(kernel, client, sal_down, client.from_sal)              # client: SAL -> legacy
    assert got[20:28] == struct.pack("!HHH", 53, 5353, 8 + len(fields["payload"])) + got[26:28]
    if not fields["checksum"]:
        assert sal_up[-len(fields["payload"]) - 2:][:2] == b"\0\0" and got[26:28] == b"\0\0", "none stays none"


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_a_checksum_that_comes_out_zero_is_sent_as_ffff_as_the_translator_does(kernel, carriage):
    client, server, _ = udp_established(kernel, carriage, 5354)
    (cflow,) = client.flows.values()
    base = datagram(U.CLIENT, 5354, U.VIP, 53, b"odd")
    # a legacy checksum (the program does not verify it) whose update gives 0; and
    # 0xFFFF, the other zero, going in
    zero = next(c for c in range(1, 0x10000) if apply_delta(c, cflow.out_delta) == 0)
    for csum in (zero, 0xFFFF):
        pkt = base[:26] + struct.pack("!H", csum) + base[28:]
        out = translated(kernel, client, pkt, client.from_legacy_udp)
        if csum == zero:
            assert out[-5:-3] == b"\xff\xff"


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_udp_counters_are_kept_in_the_map(kernel, carriage):
    client, server, _ = udp_established(kernel, carriage, 5355)
    (cflow,) = client.flows.values()
    for i in range(3):
        assert kernel.run(client, datagram(U.CLIENT, 5355, U.VIP, 53, b"q" * (10 + i)))[0] == TC_ACT_OK
    c = kernel.counters(cflow)
    assert (c.packets_out, c.bytes_out, c.packets_in, c.legacy_last_ack) == (3, 3 * 8 + 10 + 11 + 12, 0, 0)
    assert c.last_seen > 0 and c.protocol == 17


@pytest.mark.parametrize("carriage", ["ip", "udp"])
def test_what_the_program_does_not_own_of_a_udp_flow_passes_unchanged(kernel, carriage):
    client, server, bport = udp_established(kernel, carriage, 5356)
    limit = UDP_LIMIT[carriage]
    # too big for the path once our headers are added: up, and Python refuses it
    big = datagram(U.CLIENT, 5356, U.VIP, 53, b"b" * (limit - 8 + 1))
    passes(kernel, client, big)
    assert client.from_legacy_udp(big, 1.0) is None and client.stats["dropped_udp_too_big"] == 1
    assert client.outbox and client.outbox[-1][9] == 1, "an ICMP frag-needed to the sender"
    same_size = datagram(U.CLIENT, 5356, U.VIP, 53, b"b" * (limit - 8))
    translated(kernel, client, same_size, client.from_legacy_udp)         # the largest that fits
    big_down = datagram(U.SERVER, 5300, U.SGW_LAN, bport, b"b" * (limit - 8 + 1))
    passes(kernel, server, big_down)
    data = datagram(U.CLIENT, 5356, U.VIP, 53, b"abc")
    # IP options, a fragment, a length that disagrees, an unknown flow, TCP on the same 4-tuple
    with_options = bytearray(data[:20] + b"\x01\x01\x01\x00" + data[20:])
    with_options[0], with_options[2:4] = 0x46, struct.pack("!H", len(with_options))
    passes(kernel, client, bytes(with_options))
    for frag in (b"\x20\x00", b"\x00\x10"):       # MF, an offset
        passes(kernel, client, data[:6] + frag + data[8:])
    passes(kernel, client, data[:24] + struct.pack("!H", 8 + 2) + data[26:])
    passes(kernel, client, datagram(U.CLIENT, 5999, U.VIP, 53, b"abc"))
    passes(kernel, client, segment(U.CLIENT, 5356, U.VIP, 53, 1, 1, ACK, b"abc"))
    # SAL toward the client: a control packet, another peer, a short transport
    sal = server.from_backend_udp(datagram(U.SERVER, 5300, U.SGW_LAN, bport, b"ans"), 1.0)
    at = 20 if carriage == "ip" else 28
    from sal import wire
    (sflow,) = server.flows.values()
    ctl = wire.SalHeader(sflow.sal.local_flow, sflow.sal.remote_flow, 17,
                         [wire.Control(wire.ACK, 1, 1, b"\0" * 8)]).encode()
    passes(kernel, client, sal[:at] + ctl + sal[at + 12:])
    moved = bytearray(sal)
    moved[12:16] = aton("198.19.9.9")
    passes(kernel, client, bytes(moved))
    bad_len = bytearray(sal)
    bad_len[at + 12 + 4:at + 12 + 6] = struct.pack("!H", 9)
    passes(kernel, client, bytes(bad_len))
    # and what the program owns still goes through
    translated(kernel, client, data, client.from_legacy_udp)
    translated(kernel, client, sal, client.from_sal)


def test_the_kernel_follows_the_udp_flow_events(kernel, tmp_path):
    """The manager on the translators' own events: a client flow enters at the SYN-ACK,
    a server flow at the handshake ACK toward the backend only, both ways once its
    backend answered (the answer is Python's: UdpAnswered); idle expiry reads the
    kernel's last-seen; the idle close takes the flows out."""
    import time
    now = time.monotonic()              # the kernel's clock (CLOCK_MONOTONIC), as the daemon's
    timeouts = Timeouts(udp_idle=5.0)
    client, server = U.make_pair(carriage="ip", timeouts=timeouts)
    managers = {}
    for t in (client, server):
        fp = managers[t.role] = FastPath(t, f"t-{t.role}", str(tmp_path / t.role), MARK)
        fp.flows, fp.legacy = kernel.flows, kernel.legacy
        t.refresh = fp.refresh

    def drain():
        for t in (client, server):
            managers[t.role].handle(t.events)
            t.events.clear()

    bport = U.open_flow(client, server, now, sport=5357)
    drain()
    (cflow,), (sflow,) = client.flows.values(), server.flows.values()
    assert managers["client"].in_kernel(cflow.sal.local_flow)
    assert managers["server"].in_kernel(sflow.sal.local_flow)
    # toward the backend in the kernel; the backend's first answer is Python's
    query = client.from_legacy_udp(datagram(U.CLIENT, 5357, U.VIP, 53, b"q2"), now)
    assert kernel.run(server, query)[0] == TC_ACT_OK
    first = datagram(U.SERVER, 5300, U.SGW_LAN, bport, b"a")
    passes(kernel, server, first)
    answer = server.from_backend_udp(first, now)
    assert any(type(e).__name__ == "UdpAnswered" for e in server.events)
    drain()
    translated(kernel, server, datagram(U.SERVER, 5300, U.SGW_LAN, bport, b"b"), server.from_backend_udp)
    translated(kernel, client, answer, client.from_sal)
    # a query the kernel carries, well after the flow opened (the kernel's clock is the
    # tick clock: up to a tick behind)
    time.sleep(0.05)
    q = datagram(U.CLIENT, 5357, U.VIP, 53, b"late")
    assert kernel.run(client, q)[0] == TC_ACT_OK
    seen = kernel.counters(cflow).last_seen
    assert seen > now
    # idle expiry due by Python's own count is not due by the kernel's
    client.handle_timer(now + 5.0 + 0.001)
    assert cflow.closed_at is None and cflow.packets_out >= 2
    client.handle_timer(seen + 5.0 + 0.001)
    assert cflow.closed_at is not None
    drain()
    assert not managers["client"].in_kernel(cflow.sal.local_flow)
    assert kernel.flows.lookup(maps.FLOW_KEY.pack(cflow.sal.local_flow)) is None
    assert kernel.legacy.lookup(maps.legacy_key(cflow)) is None
    passes(kernel, client, q)


def test_a_lower_path_mtu_lowers_a_kernel_udp_flows_limit(kernel, tmp_path):
    client, server, _ = udp_established(kernel, "ip", 5358)
    (cflow,) = client.flows.values()
    fp = FastPath(client, "t-mtu", str(tmp_path), MARK)
    fp.flows, fp.legacy = kernel.flows, kernel.legacy
    kernel.flows.delete(maps.FLOW_KEY.pack(cflow.sal.local_flow))
    fp.install(cflow)
    pkt = datagram(U.CLIENT, 5358, U.VIP, 53, b"m" * 1300)
    assert kernel.run(client, pkt)[0] == TC_ACT_OK
    from gateway.translate.events import PathMtuLowered
    client.peer_mtu[cflow.peer_addr] = (1200, 1e12)
    fp.handle([PathMtuLowered(cflow)])
    passes(kernel, client, pkt)
    assert client.from_legacy_udp(pkt, 1.0) is None and client.stats["dropped_udp_too_big"] == 1
