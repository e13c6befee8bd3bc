"""A server gateway facing the reference stack (princeton-sns/serval) as it behaves on the
wire: a host that numbers its flows 1, 2, 3, ... and starts again from 1 when it
restarts, and whose default rule broadcasts SYNs on its subnet. ``ReferenceHost`` puts
on the wire what the captures in ../shared/captures hold (the last tests check it byte
for byte against them, and skip, saying why, where that folder is absent)."""
import random
import struct
from pathlib import Path

import pytest

from gateway.translate import PASS, Backend, ServerTranslator
from gateway.translate.carriage import ip_header, make_carriage
from gateway.translate.server import CHALLENGE_INTERVAL, CHALLENGE_TRIES
from sal import wire
from sal.flow import State
from sal.ip import IPv4, TCP, aton, ntoa, transport_checksum, transport_checksum_ok
from sal.pcap import read_pcap
from sal.serviceid import ServicePrefix, parse_service_id, service_id_for
from sal.service_table import Action, ServiceTable
from tests.unit.packets import ACK, RST, SYN, tcp_packet

REF, OURS, BROADCAST = "198.18.1.1", "198.18.1.2", "198.18.1.255"   # as in the captures
SGW_LAN, SERVER = "198.19.3.1", "198.19.3.2"
SID = parse_service_id("16385")
CAPTURES = Path(__file__).resolve().parents[3] / "shared" / "captures"
_MSS_WS = bytes.fromhex("020405a801030301")      # the reference's SYN options: MSS 1448, NOP, WS 1


class RefFlow:
    """One flow of the reference host: its numbers, and ours once it has our SYN|ACK."""

    def __init__(self, fid: int, rng: random.Random):
        self.fid = fid
        self.nonce = rng.getrandbits(64).to_bytes(8, "big")
        self.verno = rng.getrandbits(32)            # its SYN's; the next is verno + 1
        self.isn = rng.getrandbits(32)
        self.peer_flow = self.peer_verno = None
        self.peer_nonce = None
        self.state = "request"


class ReferenceHost:
    """The reference stack as a client, reduced to what it sends and answers."""

    def __init__(self, address: str = REF, seed: int = 1):
        self.address = address
        self.rng = random.Random(seed)
        self.restart()

    def restart(self) -> None:
        self.next_fid = 1                             # a small counter, from 1 again
        self.flows: dict[int, RefFlow] = {}

    def connect(self) -> RefFlow:
        flow = RefFlow(self.next_fid, self.rng)
        self.next_fid += 1
        self.flows[flow.fid] = flow
        return flow

    def syn(self, flow: RefFlow, to: str = OURS, ident: int = 1) -> bytes:
        sal = wire.SalHeader(flow.fid, 0, 6, [wire.Control(wire.SYN, flow.verno, 0, flow.nonce),
                                              wire.Service(SID)]).encode()
        seg = struct.pack("!HHIIBBHHH", 0, 0, flow.isn, 0, 7 << 4, SYN, 0, 0, 0) + _MSS_WS
        return self._ip(to, sal, seg, ident)

    def receive(self, pkt: bytes) -> bytes | None:
        """A SAL packet from the gateway; returns the host's answer, if any. As the
        reference: a flowID it does not hold is dropped unanswered (no SERVICE to resolve);
        in REQUEST only a SYN|ACK that acknowledges its SYN counts; once connected, a
        control packet with an old number is answered with an ACK (has_valid_verno)."""
        ip = IPv4(pkt)
        hdr, off = wire.decode(pkt[20:ip.total_length])
        assert hdr.checksum_ok
        flow = self.flows.get(hdr.dst_flow)
        ctl = hdr.control
        if flow is None or ctl is None:
            return None
        if flow.state == "request":
            if ctl.flags != wire.SYN | wire.ACK or ctl.ackno != (flow.verno + 1) & 0xFFFFFFFF:
                return None
            flow.peer_flow, flow.peer_verno, flow.peer_nonce = hdr.src_flow, ctl.verno, ctl.nonce
            flow.state = "connected"
            seg = pkt[20 + off:ip.total_length]
            ack = struct.pack("!HHIIBBHHH", 0, 0, (flow.isn + 1) & 0xFFFFFFFF,
                              (struct.unpack_from("!I", seg, 4)[0] + 1) & 0xFFFFFFFF, 5 << 4, ACK, 2896, 0, 0)
            sal = wire.SalHeader(flow.fid, flow.peer_flow, 6, [
                wire.Control(wire.ACK, (flow.verno + 1) & 0xFFFFFFFF, (ctl.verno + 1) & 0xFFFFFFFF, flow.nonce),
                wire.Service(SID)]).encode()
            return self._ip(ntoa(ip.src), sal, ack)
        if ctl.flags != wire.ACK and ((ctl.verno - (flow.peer_verno + 1)) & 0xFFFFFFFF) >= 0x80000000:
            sal = wire.SalHeader(flow.fid, flow.peer_flow, 6, [wire.Control(
                wire.ACK, (flow.verno + 1) & 0xFFFFFFFF, (flow.peer_verno + 1) & 0xFFFFFFFF, flow.nonce)]).encode()
            return self._ip(ntoa(ip.src), sal, b"")
        return None

    def _ip(self, to: str, sal: bytes, seg: bytes, ident: int = 1) -> bytes:
        src, dst = aton(self.address), aton(to)
        if seg:
            seg = seg[:16] + transport_checksum(src, dst, 6, seg, 16).to_bytes(2, "big") + seg[18:]
        return ip_header(src, dst, wire.PROTO_SAL, 20 + len(sal) + len(seg), ident, 64, 0, 0) + sal + seg


def make_server(**kwargs) -> ServerTranslator:
    table = ServiceTable()
    table.add(ServicePrefix(SID), Action.DEMUX, Backend(aton(SERVER), 8080, aton(SGW_LAN)))
    server = ServerTranslator(table, make_carriage("ip", "server"), **kwargs)
    server.local_addresses = {aton(OURS), aton(SGW_LAN)}
    return server


def check_backend_syn(pkt: bytes, isn: int) -> int:
    """A SYN toward the backend, whole and right; returns our port."""
    ip = IPv4(pkt)
    seg = pkt[20:]
    assert (ntoa(ip.src), ntoa(ip.dst)) == (SGW_LAN, SERVER)
    assert transport_checksum_ok(ip.src, ip.dst, 6, seg)
    t = TCP(seg)
    assert (t.flags, t.seq, t.dport) == (SYN, isn, 8080)
    return t.sport


def open_flow(host: ReferenceHost, server: ServerTranslator, now: float, answer: bool = True):
    """The host connects; with ``answer`` the backend accepts and the handshake completes.
    Returns (host flow, our port toward the backend, our flow)."""
    flow = host.connect()
    port = check_backend_syn(server.from_sal(host.syn(flow), now), flow.isn)
    ours = server.by_peer[(aton(host.address), flow.fid)]
    if answer:
        synack = tcp_packet(SERVER, 8080, SGW_LAN, port, 7000, flow.isn + 1, SYN | ACK, mss=1460)
        ack = host.receive(server.from_backend(synack, now))
        assert check_backend_ack(server.from_sal(ack, now))
        assert ours.sal.state == State.ESTABLISHED
    return flow, port, ours


def check_backend_ack(pkt: bytes) -> bool:
    return pkt is not None and TCP(pkt[20:]).flags == ACK


def resets_to_backend(server: ServerTranslator, port: int) -> list:
    """The RSTs toward the backend in the outbox, on our port ``port``."""
    return [p for p in server.outbox if IPv4(p).protocol == 6 and ntoa(IPv4(p).dst) == SERVER
            and TCP(p[20:]).flags & RST and TCP(p[20:]).sport == port]


def sal_out(server: ServerTranslator) -> list:
    out = [p for p in server.outbox if IPv4(p).protocol == wire.PROTO_SAL]
    server.outbox.clear()
    return out


# --- a restarted reference host reuses flowIDs 1, 2, 3 ----------------------------------

def test_a_restarted_host_reuses_the_flowids_of_closed_unanswered_and_dead_flows():
    host, server = ReferenceHost(), make_server()
    one, port1, old1 = open_flow(host, server, 0.0)
    two, port2, old2 = open_flow(host, server, 0.0, answer=False)   # 2: the backend never answers
    three, port3, old3 = open_flow(host, server, 0.0)      # 3: established
    server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, port1, 7001, one.isn + 1, RST), 1.0)
    assert old1.closed_at is not None                      # 1: reset, lingering
    assert [f.fid for f in (one, two, three)] == [1, 2, 3]
    server.outbox.clear()

    host.restart()                                         # its flows are gone; numbering restarts
    new1, new2, new3 = host.connect(), host.connect(), host.connect()
    assert [f.fid for f in (new1, new2, new3)] == [1, 2, 3]
    # 1: the old flow is closed: the new SYN opens a new flow at once
    check_backend_syn(server.from_sal(host.syn(new1), 2.0), new1.isn)
    assert server.stats["syn_replaced_closed"] == 1 and old1.sal.local_flow not in server.flows
    # 2: the old handshake was never answered: its half-open connection at the backend
    # is reset, and the new SYN goes on
    check_backend_syn(server.from_sal(host.syn(new2), 2.0), new2.isn)
    assert server.stats["syn_replaced_unanswered"] == 1 and len(resets_to_backend(server, port2)) == 1
    server.outbox.clear()
    # 3: the old flow looks established: the host is asked first, the SYN dropped
    assert server.from_sal(host.syn(new3), 2.0) is None
    (probe,) = sal_out(server)
    ip, (hdr, off) = IPv4(probe), wire.decode(probe[20:])
    assert (ntoa(ip.src), ntoa(ip.dst), hdr.src_flow, hdr.dst_flow) == (OURS, REF, old3.sal.local_flow, 3)
    ctl = hdr.control
    assert ctl.flags == wire.SYN | wire.ACK and ctl.nonce == old3.sal.local_nonce
    assert ctl.ackno == (three.verno + 1) & 0xFFFFFFFF and probe[20 + off:] == b""
    assert host.receive(probe) is None     # the new flow 3 is in REQUEST: not its SYN|ACK
    assert old3.sal.local_flow in server.flows and not resets_to_backend(server, port3)
    # unanswered: asked again, then given up; the backend's connection is reset
    for n in range(1, CHALLENGE_TRIES):
        now = 2.0 + n * CHALLENGE_INTERVAL
        assert server.next_deadline() <= now
        server.handle_timer(now - 0.01)
        assert sal_out(server) == []
        server.handle_timer(now + 0.001)
        (again,) = sal_out(server)
        assert again == probe and host.receive(again) is None
    server.handle_timer(2.0 + CHALLENGE_TRIES * CHALLENGE_INTERVAL - 0.01)
    assert old3.sal.local_flow in server.flows
    server.handle_timer(2.0 + CHALLENGE_TRIES * CHALLENGE_INTERVAL + 0.01)
    assert old3.sal.local_flow not in server.flows and server.stats["flows_replaced"] == 2
    assert server.stats["syn_challenge_unanswered"] == 1 and server.stats["syn_challenges_sent"] == 1
    assert len(resets_to_backend(server, port3)) == 1
    # its SYN retransmission (3 s after the first, as the reference does) opens the new flow
    check_backend_syn(server.from_sal(host.syn(new3), 5.0), new3.isn)
    assert server.by_peer[(aton(REF), 3)].sal.remote_nonce == new3.nonce
    assert server.stats["dropped_syn_challenged"] == 1


def test_a_forged_syn_does_not_end_a_live_flow():
    """Someone who knows the host's address and a flowID (small numbers: easy to guess)
    sends a SYN: the live host answers the probe, and the flow carries on."""
    host, server = ReferenceHost(), make_server()
    for _ in range(2):
        open_flow(host, server, 0.0)
    three, port3, old3 = open_flow(host, server, 0.0)
    server.outbox.clear()
    forged = RefFlow(3, random.Random(99))
    assert server.from_sal(host.syn(forged), 1.0) is None
    (probe,) = sal_out(server)
    answer = host.receive(probe)
    hdr, _ = wire.decode(answer[20:])
    assert hdr.flags == wire.ACK and hdr.control.nonce == three.nonce   # as the reference answers
    assert server.from_sal(answer, 1.01) is None
    assert server.stats["syn_challenge_answered"] == 1
    # its repetitions change nothing either (each probe the live host answers), and no
    # timer ends the flow
    for now in (1.2, 1.5, 3.0, 3.5, 20.0):
        server.handle_timer(now)
        assert server.from_sal(host.syn(forged), now) is None
        for probe in sal_out(server):
            server.from_sal(host.receive(probe), now)
    assert server.stats["syn_challenges_sent"] == 3 and server.stats["syn_challenge_answered"] == 3
    assert old3.sal.state == State.ESTABLISHED and old3.closed_at is None
    assert server.by_peer[(aton(REF), 3)] is old3 and not resets_to_backend(server, port3)
    data = tcp_packet(SERVER, 8080, SGW_LAN, port3, 7001, three.isn + 1, ACK, b"still here")
    assert server.from_backend(data, 21.0).endswith(b"still here")
    assert server.stats["syn_replaced_closed"] == server.stats["syn_replaced_unanswered"] == 0


def test_a_reset_answer_ends_the_old_flow_without_waiting():
    """A peer that answers the probe with a RST naming both flowIDs (the reference does
    from a flow it holds closed) shows it no longer knows the flow."""
    host, server = ReferenceHost(), make_server()
    three, port, old = open_flow(host, server, 0.0)
    host.restart()
    new = host.connect()
    assert server.from_sal(host.syn(new), 1.0) is None
    sal_out(server)
    rst = wire.SalHeader(new.fid, old.sal.local_flow, 6, [wire.Control(wire.RST, 0, 0, bytes(8))]).encode()
    assert server.from_sal(host._ip(OURS, rst, b""), 1.1) is None
    assert old.sal.state == State.RESET and server.stats["sal_resets_received"] == 1
    # the very next SYN (the same one, repeated) opens the new flow
    check_backend_syn(server.from_sal(host.syn(new), 1.2), new.isn)
    assert server.stats["syn_replaced_closed"] == 1


def test_the_same_syn_again_is_recognised_by_its_nonce():
    host, server = ReferenceHost(), make_server()
    flow = host.connect()
    port = check_backend_syn(server.from_sal(host.syn(flow), 0.0), flow.isn)
    (ours,) = server.flows.values()
    # repeated before the backend answered: offered again on the same port
    assert check_backend_syn(server.from_sal(host.syn(flow), 3.0), flow.isn) == port
    assert server.stats["syn_repeated"] == 1 and list(server.flows.values()) == [ours]
    synack = tcp_packet(SERVER, 8080, SGW_LAN, port, 7000, flow.isn + 1, SYN | ACK, mss=1460)
    server.from_sal(host.receive(server.from_backend(synack, 3.1)), 3.1)
    # a late copy once established: dropped, the flow stands, nobody is asked
    server.outbox.clear()
    assert server.from_sal(host.syn(flow), 4.0) is None
    assert server.stats["dropped_syn_duplicate"] == 1 and server.outbox == []
    assert ours.sal.state == State.ESTABLISHED and list(server.flows.values()) == [ours]


def test_our_own_client_gateway_answers_the_probe():
    """The probe is a repeated SYN|ACK: a client gateway of ours that holds the flow
    acknowledges it again (as the reference does), so a forged SYN from its address
    ends nothing there either."""
    from tests.unit.test_translate import CGW, handshake, make_pair

    client, server = make_pair()
    handshake(client, server)
    (cflow,) = client.flows.values()
    (sflow,) = server.flows.values()
    forged = wire.SalHeader(cflow.sal.local_flow, 0, 6, [
        wire.Control(wire.SYN, 1, 0, bytes(8)), wire.Service(service_id_for("web.svc.example", 80))]).encode()
    seg = tcp_packet("0.0.0.0", 0, "0.0.0.0", 0, 1, flags=SYN)[20:]
    forged_pkt = ip_header(aton(CGW), sflow.local_addr, 144, 20 + len(forged) + len(seg), 1, 64, 0, 0) + forged + seg
    assert server.from_sal(forged_pkt, 1.0) is None
    (probe,) = sal_out(server)
    assert client.from_sal(probe, 1.0) is None
    (answer,) = client.outbox
    server.from_sal(answer, 1.0)
    assert server.stats["syn_challenge_answered"] == 1
    server.handle_timer(5.0)
    assert sflow.sal.state == State.ESTABLISHED and sflow.sal.local_flow in server.flows


# --- a SYN broadcast on our subnet ------------------------------------------------------

def broadcast_server(**kwargs) -> ServerTranslator:
    server = make_server(**kwargs)
    server.broadcast_addresses = {aton(BROADCAST): aton(OURS)}
    return server


def test_a_broadcast_syn_is_answered_from_our_address_on_that_subnet():
    host, server = ReferenceHost(), broadcast_server()
    flow = host.connect()
    # the rewritten SYN is sent anew: the kernel neither forwards nor delivers to TCP a
    # packet that arrived as a broadcast
    assert server.from_sal(host.syn(flow, to=BROADCAST), 0.0) is None
    (to_backend,) = server.outbox
    server.outbox.clear()
    port = check_backend_syn(to_backend, flow.isn)
    assert server.stats["syn_broadcast_accepted"] == 1
    synack = server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, port, 7000, flow.isn + 1, SYN | ACK, mss=1460), 0.0)
    assert (ntoa(IPv4(synack).src), ntoa(IPv4(synack).dst)) == (OURS, REF)
    assert transport_checksum_ok(aton(OURS), aton(REF), 6, synack[20 + wire.decode(synack[20:])[1]:])
    ack = host.receive(synack)
    assert ack is not None and check_backend_ack(server.from_sal(ack, 0.0))
    # its repetition (same nonce) is the same SYN, sent anew too
    assert server.from_sal(host.syn(flow, to=BROADCAST), 0.1) is None
    assert server.stats["dropped_syn_duplicate"] == 1


def test_a_broadcast_syn_can_be_refused_by_config_and_passes_when_not_ours():
    host, server = ReferenceHost(), broadcast_server(accept_broadcast_syn=False)
    assert server.from_sal(host.syn(host.connect(), to=BROADCAST), 0.0) is PASS
    assert server.flows == {} and server.outbox == []
    # a service we do not serve: the SYN was asked of every host there; not ours, not a drop
    server = broadcast_server()
    server.table = ServiceTable()
    assert server.from_sal(host.syn(host.connect(), to=BROADCAST), 0.0) is PASS
    assert server.stats["dropped_no_service"] == 0 and server.flows == {}
    # a broadcast address that is not one of ours passes as any SYN on its way elsewhere
    assert make_server().from_sal(host.syn(host.connect(), to=BROADCAST), 0.0) is PASS


# --- the model against the captures -----------------------------------------------------

def capture(name: str) -> list:
    if not CAPTURES.is_dir():
        pytest.skip(f"reference captures not found at {CAPTURES} (they live in the shared "
                    "workspace beside the repository, not in a plain clone)")
    return [ip for _, ip in read_pcap((CAPTURES / name).read_bytes())]


@pytest.mark.parametrize("name, to", [("tcp_basic.pcap", OURS), ("tcp_default_rule_broadcast.pcap", BROADCAST)])
def test_the_model_puts_on_the_wire_what_the_reference_does(name, to):
    syn = capture(name)[0]
    hdr, _ = wire.decode(syn[20:])
    ctl = hdr.control
    flow = RefFlow(hdr.src_flow, random.Random(0))
    flow.verno, flow.nonce, flow.isn = ctl.verno, ctl.nonce, struct.unpack_from("!I", syn, 20 + 68 + 4)[0]
    assert ReferenceHost().syn(flow, to=to, ident=struct.unpack_from("!H", syn, 4)[0]) == syn


def test_the_captured_broadcast_syn_is_answered_as_the_reference_answered_it():
    syn, synack = capture("tcp_default_rule_broadcast.pcap")[:2]
    server = broadcast_server()
    assert server.from_sal(syn, 0.0) is None
    (to_backend,) = server.outbox
    hdr, _ = wire.decode(syn[20:])
    port = check_backend_syn(to_backend, struct.unpack_from("!I", syn, 20 + 68 + 4)[0])
    isn = TCP(to_backend[20:]).seq
    ours = server.from_backend(tcp_packet(SERVER, 8080, SGW_LAN, port, 9, isn + 1, SYN | ACK, mss=1460), 0.0)
    # the reference's answer: unicast from its address on the subnet, to the sender,
    # naming the sender's flowID, acknowledging its SYN
    for pkt in (synack, ours):
        ip, (h, _) = IPv4(pkt), wire.decode(pkt[20:])
        assert (ntoa(ip.src), ntoa(ip.dst), h.dst_flow) == (OURS, REF, hdr.src_flow)
        assert h.flags == wire.SYN | wire.ACK and h.control.ackno == (hdr.control.verno + 1) & 0xFFFFFFFF
