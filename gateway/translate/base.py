"""What both sides of the gateway pair share: the flow record, the SAL receive path,
timers and counters."""
import heapq
import os
import random
import struct
from collections import Counter
from dataclasses import dataclass

from sal import wire
from sal.checksum import apply_delta, delta, fold
from sal.flow import Event, Rejected, SalFlow, State
from sal.ip import IPv4, TCP_ACK, TCP_FIN, TCP_RST, clamp_mss, ntoa, transport_checksum, transport_checksum_ok
from sal.wire import MalformedPacket, SalHeader

from .carriage import header_sum, ip_header
from .events import FlowClosed, FlowClosing, FlowEstablished, FlowSteady
from .icmp import IcmpMixin
from .limits import Limits, LimitsMixin
from .migration import MigrationMixin
from .udp import UdpMixin
from .verdict import PASS

_TCP_PORTS = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_IDENT_FRAG = struct.Struct("!HH")
IPV4_TCP_HEADERS = 40


# a data packet of a flow in these states takes the full path (a handshake to finish, a
# reset flow's late data to drop)
_FULL_PATH_STATES = frozenset((State.SYN_RECEIVED, State.RESET))

@dataclass
class Timeouts:
    idle: float = 7200.0        # an established flow with no packets
    handshake: float = 60.0     # a flow whose handshake never completed
    linger: float = 5.0         # after both directions closed: late retransmissions
    reset_linger: float = 2.0   # after a reset
    # an established flow quiet this long sends its peer a SAL ACK, so that a NAT on the
    # way keeps its mapping (home routers forget idle UDP in 30-180 s); 0: never
    keepalive: float = 0.0
    udp_idle: float = 30.0      # a UDP flow with no datagrams either way (conntrack's 30 s)


class Flow:
    """One translated connection: its SAL state and the rewrite constants of each way."""

    __slots__ = ("sal", "peer_addr", "peer_port", "local_addr", "legacy_key",
                 "legacy_src", "legacy_dst", "legacy_sport", "legacy_dport",
                 "out_hdr", "in_hdr", "out_delta", "in_delta", "out_ip_sum", "in_ip_sum",
                 "created", "last_seen", "packets_out", "packets_in", "bytes_out", "bytes_in",
                 "legacy_fin_end", "legacy_last_ack", "send_handshake_ack",
                 "closed_at", "syn_seq", "extra", "held", "hold_deadline", "moving_peer",
                 "migration_started", "prev_peer_addr", "source_key", "remote_fin_end",
                 "remote_fin_acked", "rebind_to", "udp")

    def __init__(self, sal: SalFlow, now: float):
        self.sal = sal
        self.peer_addr = self.local_addr = b"\0\0\0\0"
        self.peer_port = 0
        self.legacy_key = None
        self.created = self.last_seen = now
        self.packets_out = self.packets_in = self.bytes_out = self.bytes_in = 0
        self.legacy_fin_end = None      # seq just past the legacy side's FIN
        self.remote_fin_end = None      # ... and the remote side's
        self.remote_fin_acked = False   # the legacy side acknowledged the remote FIN
        self.legacy_last_ack = 0
        self.send_handshake_ack = False
        self.closed_at = None
        self.syn_seq = None
        self.extra = None
        self.held = None                # legacy packets held while a move is unconfirmed
        self.hold_deadline = 0.0
        self.moving_peer = None         # (address, port) the peer is moving to
        self.migration_started = None
        self.prev_peer_addr = None      # the peer's address before its last move
        self.rebind_to = None           # (address, port) a path challenge went to (NAT rebinding)
        self.source_key = None          # what the per-source cap counts this flow under
        self.udp = None                 # a UDP flow's own state (udp.py); None for TCP

    def set_legacy(self, src: bytes, dst: bytes, sport: int, dport: int) -> None:
        """The legacy side's view: ``src``:``sport`` is the legacy host, ``dst``:``dport``
        the address it talks to (a virtual service address, or our backend-side address)."""
        self.legacy_src, self.legacy_dst = src, dst
        self.legacy_sport, self.legacy_dport = sport, dport

    def rebuild(self, carriage) -> None:
        """Precompute what every packet of the flow shares (checksum deltas, the data
        headers each way, constant parts of IP header checksums), once per path change."""
        pseudo_local, pseudo_peer = carriage.pseudo(self.local_addr, self.peer_addr)
        legacy = self.legacy_src + self.legacy_dst + _TCP_PORTS.pack(self.legacy_sport, self.legacy_dport)
        sal_side = pseudo_local + pseudo_peer + b"\0\0\0\0"
        self.out_delta = delta(legacy, sal_side)
        back_legacy = self.legacy_dst + self.legacy_src + _TCP_PORTS.pack(self.legacy_dport, self.legacy_sport)
        self.in_delta = delta(pseudo_peer + pseudo_local + b"\0\0\0\0", back_legacy)
        protocol = self.sal.protocol
        self.out_hdr = wire.base_header(self.sal.local_flow, self.sal.remote_flow, protocol)
        self.in_hdr = wire.base_header(self.sal.remote_flow, self.sal.local_flow, protocol)
        self.out_ip_sum = header_sum(self.local_addr, self.peer_addr, carriage.protocol)
        self.in_ip_sum = header_sum(self.legacy_dst, self.legacy_src, protocol)

    @property
    def state(self) -> State:
        return self.sal.state


class Translator(MigrationMixin, LimitsMixin, IcmpMixin, UdpMixin):
    """The shared machinery; ``ClientTranslator`` and ``ServerTranslator`` add each side."""

    role = "?"

    def __init__(self, carriage, mtu: int = 1500, timeouts: Timeouts | None = None,
                 rng: random.Random | None = None, rto_initial: float | None = None,
                 limits: Limits | None = None):
        self.carriage = carriage
        self.timeouts = timeouts or Timeouts()
        self._mss_overhead = IPV4_TCP_HEADERS + wire.BASE_LEN + carriage.overhead
        self.mss_limit = mtu - self._mss_overhead
        self.rng = rng or random.Random(int.from_bytes(os.urandom(8), "big"))
        self.rto_initial = rto_initial
        self._body_at = 20 + carriage.overhead    # SAL header offset in a plain packet
        self.flows: dict[int, Flow] = {}          # by our flowID
        self.outbox: list[bytes] = []
        self.events: list = []                    # typed records (events.py), drained by the daemon
        # set by the daemon when packets are also counted elsewhere (the kernel fast
        # path): folds those counts into a flow before its deadline is judged
        self.refresh = None
        self.stats: Counter = Counter()
        self._expiry: list = []                   # heap of (deadline, flowID)
        self._retransmitting: set[int] = set()
        self._rtx_heap: list = []                 # (retransmission deadline, flowID), checked lazily
        self._init_limits(limits)
        self._init_icmp()
        self._init_udp()
        self.accepting = True                     # False while draining: no new flows
        self._holding: dict[int, tuple] = {}      # flows holding packets during a move: path before it
        # Our addresses, kept current by the daemon. SAL is queued whatever its
        # destination, so that packets still sent to an address we just lost are
        # translated; what is for no flow of ours and not for us passes.
        self.local_addresses: set[bytes] = set()
        self.migration_times: list[float] = []    # seconds from move to confirmed path
        self.handshake_times: list[float] = []    # seconds from the first SYN to established
        self.forgotten_bytes_out = self.forgotten_bytes_in = 0   # of flows no longer held
        self._keepalive_at: float | None = None   # the next look for quiet flows

    # --- flows ---------------------------------------------------------------------
    def _new_flow(self, now: float, protocol: int = 6) -> Flow:
        while True:
            fid = self.rng.getrandbits(32)
            if fid and fid not in self.flows:
                break
        kwargs = {"protocol": protocol}
        if self.rto_initial is not None:
            kwargs["rto_initial"] = self.rto_initial
        sal = SalFlow(fid, self.rng.getrandbits(64).to_bytes(8, "big"), self.rng.getrandbits(32), **kwargs)
        flow = Flow(sal, now)
        self.flows[fid] = flow
        heapq.heappush(self._expiry, (now + self.timeouts.handshake, fid))
        self.stats["flows_opened"] += 1
        return flow

    def _handshake_timed(self, flow: Flow, now: float) -> None:
        self.stats["handshakes_completed"] += 1
        self.handshake_times.append(now - flow.created)
        del self.handshake_times[:-1000]

    def _adopt_common(self, flow: Flow, source: bytes, now: float) -> None:
        """Enter a flow restored from a snapshot into the shared tables."""
        self.flows[flow.sal.local_flow] = flow
        heapq.heappush(self._expiry, (now + self.timeouts.idle, flow.sal.local_flow))
        self._opened(flow, source)
        self._handshake_done(flow, None)
        self.stats["flows_resumed"] += 1

    def _forget(self, flow: Flow) -> None:
        """Drop a flow from every table (subclasses remove their own keys)."""
        if self.flows.pop(flow.sal.local_flow, None) is not None:
            self.forgotten_bytes_out += flow.bytes_out
            self.forgotten_bytes_in += flow.bytes_in
        self._retransmitting.discard(flow.sal.local_flow)
        self._holding.pop(flow.sal.local_flow, None)
        if flow.held:
            self._held_total -= len(flow.held)
            flow.held = None
        self._closed_out(flow)
        if flow.udp is not None:
            self._udp_forget(flow)
        reason = flow.sal.state.value if flow.closed_at is not None and flow.sal.state else "expired"
        self.events.append(FlowClosed(flow, reason, flow.bytes_out, flow.bytes_in))

    def _handshake_done(self, flow: Flow, now: float | None) -> None:
        """Both handshakes are complete: plain data from here on."""
        super()._handshake_done(flow)
        # from now on the idle timeout applies, which may be shorter than the handshake's
        heapq.heappush(self._expiry, (self._deadline(flow), flow.sal.local_flow))
        self.events.append(FlowEstablished(flow, None if now is None else now - flow.created))
        if self.timeouts.keepalive and self._keepalive_at is None:
            self._keepalive_at = flow.last_seen + self.timeouts.keepalive

    def _deadline(self, flow: Flow) -> float:
        state = flow.sal.state
        if flow.closed_at is not None:
            linger = self.timeouts.reset_linger if state in (State.RESET, State.FAILED) else self.timeouts.linger
            return flow.closed_at + linger
        if state == State.ESTABLISHED and not flow.send_handshake_ack:
            return flow.last_seen + (self.timeouts.idle if flow.udp is None else self.timeouts.udp_idle)
        return flow.last_seen + self.timeouts.handshake

    def _finish(self, flow: Flow, now: float, reason: str) -> None:
        if flow.closed_at is None:
            flow.closed_at = now
            self._source_done(flow)            # only live flows count against a source
            self.events.append(FlowClosing(flow))
            self.stats[f"flows_{reason}"] += 1
            heapq.heappush(self._expiry, (self._deadline(flow), flow.sal.local_flow))

    # --- timers --------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """The earliest timer: cheap enough to ask after every batch of packets (the
        retransmission and expiry heaps are checked at the top only)."""
        heap = self._rtx_heap
        while heap:
            at, fid = heap[0]
            flow = self.flows.get(fid)
            real = flow.sal.next_deadline() if flow is not None and fid in self._retransmitting else None
            if real == at:
                break
            heapq.heappop(heap)                 # stale: answered, resent, or gone
            if real is not None:
                heapq.heappush(heap, (real, fid))
        times = [heap[0][0]] if heap else []
        times += [self.flows[f].hold_deadline for f in self._holding if f in self.flows]
        if self._expiry:
            times.append(self._expiry[0][0])
        if self._keepalive_at is not None:
            times.append(self._keepalive_at)
        return min(times) if times else None

    def _send_keepalives(self, now: float) -> None:
        """A SAL ACK on each established flow quiet for the keepalive interval; the next
        look in half an interval while any flow is established."""
        every = self.timeouts.keepalive
        self._keepalive_at = None
        if not every:
            return
        live = False
        for flow in self.flows.values():
            if flow.closed_at is not None or flow.sal.state != State.ESTABLISHED or flow.send_handshake_ack:
                continue
            live = True
            if now - flow.last_seen < every:
                continue
            if self.refresh is not None:
                self.refresh(flow)             # the kernel may have carried its packets
            if now - flow.last_seen >= every and flow.sal.outstanding is None and flow.held is None:
                self._emit_sal(flow, flow.sal.keepalive().encode())
                self.stats["keepalives_sent"] += 1
        if live:
            self._keepalive_at = now + every / 2

    def handle_timer(self, now: float) -> None:
        self._expire_holds(now)
        if self._keepalive_at is not None and self._keepalive_at <= now:
            self._send_keepalives(now)
        heap, due = self._rtx_heap, set()
        while heap and heap[0][0] <= now:
            due.add(heapq.heappop(heap)[1])
        for fid in due:
            flow = self.flows.get(fid)
            if flow is None or flow.sal.outstanding is None or fid not in self._retransmitting:
                self._retransmitting.discard(fid)
                continue
            events, resend = flow.sal.handle_timer(now)
            for hdr, transport in resend:
                self.stats["control_retransmits"] += 1
                self._emit_sal(flow, hdr.encode() + transport)
            if Event.FAILED in events:
                self._retransmitting.discard(fid)
                self.stats["flows_failed_control_timeout"] += 1
                self._reset_legacy(flow)
                self._finish(flow, now, "failed")
            else:
                self._track_retransmit(flow)    # its next deadline (or a stale entry's)
        while self._expiry and self._expiry[0][0] <= now:
            _, fid = heapq.heappop(self._expiry)
            flow = self.flows.get(fid)
            if flow is None:
                continue
            deadline = self._deadline(flow)
            if deadline > now:
                heapq.heappush(self._expiry, (deadline, fid))
            elif flow.closed_at is None:
                if self.refresh is not None:
                    self.refresh(flow)         # counted elsewhere since: still idle?
                    deadline = self._deadline(flow)
                    if deadline > now:
                        heapq.heappush(self._expiry, (deadline, fid))
                        continue
                self.stats["flows_idle_expired"] += 1
                if flow.udp is not None and self._udp_idle_close(flow, now):
                    continue                   # its SAL FIN is out: it lingers for the close
                if flow.sal.state == State.ESTABLISHED:
                    # both legacy ends hear it: ours directly, the peer's through its gateway
                    self._emit_sal(flow, flow.sal.reset().encode())
                    self.stats["sal_resets_sent"] += 1
                    self._reset_legacy(flow)
                self._forget(flow)
            else:
                self._forget(flow)

    # --- SAL input -----------------------------------------------------------------
    def _data_flow(self, pkt: bytes) -> Flow | None:
        """The fast path: the flow of a plain data packet whose SAL header is byte for
        byte the one its flow expects (flowIDs, length, protocol and so the checksum),
        from the flow's peer, unfragmented. Anything else takes the full path."""
        at = self._body_at
        if len(pkt) < at + 32 or pkt[0] != 0x45 or not self.carriage.is_ours(pkt):
            return None
        flow = self.flows.get(_U32.unpack_from(pkt, at + 4)[0])
        if (flow is None or pkt[at:at + 12] != flow.in_hdr or pkt[12:16] != flow.peer_addr
                or pkt[16:20] != flow.local_addr
                or _U16.unpack_from(pkt, 2)[0] != len(pkt) or pkt[6] & 0x3F or pkt[7]):
            return None
        if at != 20 and _U16.unpack_from(pkt, 20)[0] != flow.peer_port:
            return None          # over UDP, from another port: a NAT rebound the peer
        return flow

    def _fast_from_sal(self, pkt: bytes, now: float) -> bytes | None:
        """from_sal's data fast path: the translated packet, or None for the full path."""
        flow = self._data_flow(pkt)
        if flow is None or flow.sal.state in _FULL_PATH_STATES:
            return None
        seg = pkt[self._body_at + 12:]
        if flow.udp is not None:
            return self._udp_from_sal(flow, pkt, seg, now)
        if seg[13] & (TCP_FIN | TCP_RST):
            return None          # checked on the full path before anyone acts on it
        self._track_tcp(flow, seg, False, now)
        self.stats["from_sal"] += 1
        return self._to_legacy(flow, pkt, seg, now)

    def _parse_sal(self, pkt: bytes):
        """(ip, SalHeader, transport offset, peer port, body) or None (dropped, counted)."""
        try:
            ip = IPv4(pkt)
            if len(pkt) != ip.total_length:
                self.stats["dropped_truncated_copy"] += 1
                return None
            if ip.is_fragment:
                self.stats["dropped_fragment"] += 1
                return None
            found = self.carriage.unwrap(pkt, ip.ihl, ip.protocol, ip.total_length)
            if found is None:
                return PASS
            body, peer_port = found
            hdr, off = wire.decode(body)
        except MalformedPacket as exc:
            self.stats["malformed"] += 1
            self.stats[f"dropped_{exc.reason}"] += 1
            return None
        if not hdr.checksum_ok:
            self.stats["dropped_sal_bad_checksum"] += 1
            return None
        if hdr.protocol != 6:
            if hdr.protocol != 17:
                self.stats["dropped_sal_not_tcp_or_udp"] += 1
                return None
            if len(body) > off and len(body) - off < 8:
                self.stats["malformed"] += 1
                self.stats["dropped_udp_truncated"] += 1
                return None
        elif len(body) > off and len(body) - off < 20:
            self.stats["malformed"] += 1
            self.stats["dropped_tcp_truncated"] += 1
            return None
        return ip, hdr, off, peer_port, body

    def _from_sal_flow(self, flow: Flow, pkt: bytes, ip: IPv4, hdr: SalHeader, off: int,
                       peer_port: int, body: bytes, now: float):
        """The full path for a SAL packet of a known flow: checks, control, translation."""
        if hdr.protocol != flow.sal.protocol:
            self.stats["dropped_wrong_protocol"] += 1
            return None
        if hdr.control is None:
            if hdr.src_flow != flow.sal.remote_flow:
                self.stats["dropped_wrong_peer"] += 1
                return None
            if flow.sal.state == State.RESET:
                # sent before the reset: the legacy connection is gone, and its 4-tuple
                # may already be a new connection's (a port given back at once)
                self.stats["dropped_after_reset"] += 1
                return None
            if self._from_elsewhere(flow, ip.src, peer_port):
                self.challenge_path(flow, ip.src, peer_port, now)
            if ip.src != flow.peer_addr and ip.src != flow.prev_peer_addr:
                if flow.moving_peer is None or flow.moving_peer[0] != ip.src:
                    self.stats["dropped_wrong_peer"] += 1    # until the new path answers
                    return None
            if flow.moving_peer is not None and flow.moving_peer[0] == ip.src:
                # data from where the peer is moving: its ACK was lost, the data confirms it
                flow.sal.peer_moving = False
                self._on_peer_moved(flow, ip.src, peer_port, now)
            if flow.sal.state == State.SYN_RECEIVED:
                flow.sal.receive(hdr, now)     # data stands in for a lost handshake ACK
                self._track_retransmit(flow)
                self._handshake_done(flow, now)
                self._handshake_timed(flow, now)
        else:
            events = self._sal_control(flow, ip, hdr, now, off < len(body), peer_port)
            if events is None:
                return None
            if not events and self._from_elsewhere(flow, ip.src, peer_port):
                self.challenge_path(flow, ip.src, peer_port, now)   # a keepalive, say
            self._after_control(flow, ip, peer_port, events, now)
        if flow.udp is not None:
            return self._udp_from_sal_flow(flow, pkt, hdr, off, body, self._in_delta_for(flow, ip), now)
        if off >= len(body):
            if hdr.control is None:
                self.stats["dropped_empty"] += 1   # neither control nor data
            return None          # control only: consumed here
        seg = body[off:]
        if not self._track_tcp(flow, seg, False, now, self.carriage.pseudo(ip.src, ip.dst)):
            return None
        self.stats["from_sal"] += 1
        return self._to_legacy(flow, pkt, seg, now, self._in_delta_for(flow, ip))

    def _from_elsewhere(self, flow: Flow, addr: bytes, port: int) -> bool:
        """A packet of the flow from another address, or UDP port, than the peer's
        (and not from where a move of the peer's own is taking it)."""
        if addr == flow.peer_addr and (not port or port == flow.peer_port):
            return False
        if addr == flow.prev_peer_addr and addr != flow.peer_addr:
            return False         # still queued from before the peer's own move: its own
        return flow.moving_peer is None and flow.rebind_to != (addr, port)

    def _after_control(self, flow: Flow, ip: IPv4, peer_port: int, events: list, now: float) -> None:
        """What a side does on a flow's events besides the shared handling."""

    def _sal_control(self, flow: Flow, ip: IPv4, hdr: SalHeader, now: float,
                     carries_segment: bool, peer_port: int = 0) -> list | None:
        """Feed a packet's control part to the flow. Returns events, or None if rejected.
        A reset is passed on to the legacy host here unless the packet carries the
        TCP RST itself."""
        try:
            events, replies = flow.sal.receive(hdr, now, on_path=ip.src == flow.peer_addr)
        except Rejected as exc:
            self.stats[f"dropped_{exc.reason}"] += 1
            return None
        if Event.PEER_MOVING in events:
            # answer where the RSYN came from; switch only when its ACK arrives
            self._on_peer_moving(flow, ip.src, peer_port, now)
            for reply in replies:
                self.outbox.append(self.carriage.wrap(flow.local_addr, ip.src, reply.encode(),
                                                      peer_port or flow.peer_port))
            replies = []
        challenge = flow.rebind_to is not None and (Event.MIGRATED in events or Event.FIN_ACKED in events)
        if challenge:
            self._challenge_answered(flow, ip.src, peer_port, events)   # before the ACK goes out
        for reply in replies:
            self._emit_sal(flow, reply.encode())
        if challenge and Event.MIGRATED in events:
            self._release(flow, now)             # (an RSYN of ours was only a challenge)
        elif Event.MIGRATED in events:
            self._on_migrated(flow, now)
        if Event.PEER_MOVED in events:
            self._on_peer_moved(flow, ip.src, peer_port, now)
        pending = flow.sal.take_pending(now)
        if pending is not None:
            self._emit_sal(flow, pending.encode())
        self._track_retransmit(flow)
        if Event.ESTABLISHED in events:
            self._handshake_timed(flow, now)
            if self.role == "server":
                self._handshake_done(flow, now)   # (a client's waits for its legacy client's ACK)
        if Event.RESET in events:
            self.stats["sal_resets_received"] += 1
            if not carries_segment:
                self._reset_legacy(flow)
            self._finish(flow, now, "reset")
        elif Event.CLOSED in events:
            self._finish(flow, now, "closed")
        return events

    def _track_retransmit(self, flow: Flow) -> None:
        if flow.sal.outstanding is not None:
            self._retransmitting.add(flow.sal.local_flow)
            heapq.heappush(self._rtx_heap, (flow.sal.outstanding.deadline, flow.sal.local_flow))
        else:
            self._retransmitting.discard(flow.sal.local_flow)

    def _answer_unknown(self, ip: IPv4, hdr: SalHeader, peer_port: int):
        """A SAL packet for no flow of ours: not addressed to us, it is someone else's
        and passes; addressed to us, it is dropped and answered with a RST (never a
        RST, never a bare SYN)."""
        if self.local_addresses and ip.dst not in self.local_addresses:
            return PASS
        self.stats["dropped_no_flow"] += 1
        ctl = hdr.control
        if ctl is not None and ctl.flags & (wire.RST | wire.SYN):
            return None
        self._sal_reset(ip, hdr, peer_port, 6)
        return None

    def _refuse_sal_syn(self, ip: IPv4, hdr: SalHeader, peer_port: int, reason: str):
        """A SAL SYN we cannot take (a cap, no port toward the backend): answered with a
        RST, so the client gateway tells its legacy client at once instead of letting it
        wait out its retransmissions. Counted as ``refused_<reason>``."""
        self.stats[f"refused_{reason}"] += 1
        self._sal_reset(ip, hdr, peer_port, hdr.protocol)
        return None

    def _sal_reset(self, ip: IPv4, hdr: SalHeader, peer_port: int, protocol: int) -> None:
        ctl = hdr.control
        rst = SalHeader(hdr.dst_flow, hdr.src_flow, protocol, [wire.Control(
            wire.RST, 0, (ctl.verno + 1) & 0xFFFFFFFF if ctl else 0, b"\0" * 8)])
        self.outbox.append(self.carriage.wrap(ip.dst, ip.src, rst.encode(), peer_port))
        self.stats["sal_resets_sent"] += 1

    # --- SAL output ----------------------------------------------------------------
    def _emit_sal(self, flow: Flow, body: bytes) -> None:
        self.outbox.append(self.carriage.wrap(flow.local_addr, flow.peer_addr, body, flow.peer_port))
        if flow.rebind_to is not None:          # a path challenge: the new place too
            addr, port = flow.rebind_to
            self.outbox.append(self.carriage.wrap(flow.local_addr, addr, body, port))

    def _to_sal(self, flow: Flow, pkt: bytes, seg: bytes, now: float, sal_header: bytes,
                csum_delta: int | None = None) -> bytes:
        """A legacy TCP segment as a SAL packet toward the peer (the hot path)."""
        csum = apply_delta(_U16.unpack_from(seg, 16)[0], flow.out_delta if csum_delta is None else csum_delta)
        body = sal_header + b"\0\0\0\0" + seg[4:16] + _U16.pack(csum) + seg[18:]
        flow.packets_out += 1
        flow.bytes_out += len(seg)
        flow.last_seen = now
        ident, frag = _IDENT_FRAG.unpack_from(pkt, 4)
        return self.carriage.wrap(flow.local_addr, flow.peer_addr, body, flow.peer_port,
                                  ident, pkt[8], pkt[1], frag & 0x4000, flow.out_ip_sum)

    def _sal_segment(self, flow: Flow, seg: bytes, csum_delta: int) -> bytes:
        """A legacy segment as the SAL transport (ports zeroed), for control packets."""
        csum = apply_delta(_U16.unpack_from(seg, 16)[0], csum_delta)
        return b"\0\0\0\0" + seg[4:16] + _U16.pack(csum) + seg[18:]

    def _to_legacy(self, flow: Flow, pkt: bytes, seg: bytes, now: float,
                   csum_delta: int | None = None) -> bytes:
        """A SAL packet's TCP segment as a legacy packet toward the legacy host."""
        csum = apply_delta(_U16.unpack_from(seg, 16)[0], flow.in_delta if csum_delta is None else csum_delta)
        seg = _TCP_PORTS.pack(flow.legacy_dport, flow.legacy_sport) + seg[4:16] + _U16.pack(csum) + seg[18:]
        flow.packets_in += 1
        flow.bytes_in += len(seg)
        flow.last_seen = now
        ident, frag = _IDENT_FRAG.unpack_from(pkt, 4)
        return ip_header(flow.legacy_dst, flow.legacy_src, 6, 20 + len(seg), ident, pkt[8],
                         pkt[1], frag & 0x4000, flow.in_ip_sum) + seg

    def _in_delta_for(self, flow: Flow, ip: IPv4) -> int | None:
        """The inbound checksum delta for a packet whose addresses are not the flow's
        current ones (sent to our old address during a move); None when they are."""
        if ip.src == flow.peer_addr and ip.dst == flow.local_addr:
            return None
        pseudo_peer, pseudo_local = self.carriage.pseudo(ip.src, ip.dst)
        back_legacy = flow.legacy_dst + flow.legacy_src + _TCP_PORTS.pack(flow.legacy_dport, flow.legacy_sport)
        return delta(pseudo_peer + pseudo_local + b"\0\0\0\0", back_legacy)

    def _clamp(self, seg: bytes, csum_delta: int, peer: bytes | None = None,
               now: float = 0.0) -> tuple[bytes, int]:
        """Clamp the MSS of a SYN segment to what fits the path toward ``peer`` (the
        configured MTU, or less where an ICMP taught it); returns the segment and an
        extra checksum delta."""
        buf = bytearray(seg)
        limit = self.mss_limit if peer is None else self.mss_limit_toward(peer, now)
        changed = clamp_mss(buf, (buf[12] >> 4) * 4, limit)
        if changed is None:
            return seg, csum_delta
        old, new = changed
        self.stats["mss_clamped"] += 1
        return bytes(buf), fold(csum_delta + (~old & 0xFFFF) + new)

    def _track_tcp(self, flow: Flow, seg: bytes, from_legacy: bool, now: float,
                   sal_pseudo: tuple | None = None) -> bool:
        """Follow TCP FINs and the ACKs that cover them: once a side's FIN is acknowledged,
        that side's SAL direction is finished (FIN, then SAL FIN, as the reference does).
        A FIN or RST whose checksum fails is dropped (False): one flipped bit on the path
        must not end a flow that the receiving TCP would have kept."""
        flags = seg[13]
        if flags & (TCP_FIN | TCP_RST):
            pseudo = (flow.legacy_src, flow.legacy_dst) if from_legacy else sal_pseudo
            if not transport_checksum_ok(*pseudo, 6, seg):
                self.stats["dropped_fin_rst_bad_checksum"] += 1
                if flow.closed_at is None:
                    self.events.append(FlowSteady(flow))   # nothing happened to the flow
                return False
            self.events.append(FlowClosing(flow))
        if from_legacy:
            if flags & TCP_ACK:
                flow.legacy_last_ack = ack = _U32.unpack_from(seg, 8)[0]   # for a RST we may owe it
                if flow.remote_fin_end is not None and _seq_geq(ack, flow.remote_fin_end):
                    flow.remote_fin_acked = True
            if flags & TCP_FIN:
                flow.legacy_fin_end = _fin_end(seg)
        else:
            if flags & TCP_FIN:
                flow.remote_fin_end = _fin_end(seg)
            if flow.legacy_fin_end is not None and flags & TCP_ACK \
                    and _seq_geq(_U32.unpack_from(seg, 8)[0], flow.legacy_fin_end):
                # the remote side acknowledged our legacy side's FIN: our SAL FIN
                hdr = flow.sal.close(now)
                if hdr is not None:
                    self._emit_sal(flow, hdr.encode())
                    self._track_retransmit(flow)
        if flags & TCP_RST:
            self.stats["tcp_resets_seen"] += 1
            if not from_legacy and flow.legacy_last_ack:
                if self.refresh is not None:
                    self.refresh(flow)
                if _U32.unpack_from(seg, 4)[0] != flow.legacy_last_ack:
                    # RFC 5961: only a RST at exactly the next expected sequence number
                    # resets; the legacy TCP answers any other with a challenge ACK, and
                    # a peer that really reset answers that with an exact RST
                    self.stats["tcp_resets_not_exact"] += 1
                    return True
            if flow.sal.fin_sent and flow.remote_fin_acked:
                # both FINs were sent and acknowledged: the TCP connection was over, and
                # this RST answers a late duplicate; the SAL close goes on as usual
                return True
            if flow.sal.state != State.RESET:
                flow.sal.state = State.RESET
                flow.sal.outstanding = None
            self._finish(flow, now, "reset")
        return True

    def _after_reset(self, flow: Flow, pkt: bytes, seg: bytes) -> None:
        """A legacy packet of a flow that was reset (not a RST): not for the peer, which
        has let the flow go. Answered as the gone end's own TCP would (a RST at the
        packet's ACK number), which closes the legacy connection if a RST to it missed."""
        self.stats["dropped_after_reset"] += 1
        self._refuse(IPv4(pkt), seg)

    def _refuse(self, ip: IPv4, seg: bytes) -> None:
        """Answer a legacy segment that matches nothing with a TCP RST (never a RST)."""
        flags = seg[13]
        if flags & TCP_RST:
            return
        sport, dport, seq, ack = struct.unpack_from("!HHII", seg)
        if flags & TCP_ACK:
            rst = struct.pack("!HHIIBBHHH", dport, sport, ack, 0, 0x50, TCP_RST, 0, 0, 0)
        else:
            length = len(seg) - (seg[12] >> 4) * 4 + (1 if flags & 0x02 else 0) + (1 if flags & TCP_FIN else 0)
            rst = struct.pack("!HHIIBBHHH", dport, sport, 0, (seq + length) & 0xFFFFFFFF, 0x50,
                              TCP_RST | TCP_ACK, 0, 0, 0)
        csum = transport_checksum(ip.dst, ip.src, 6, rst, 16)
        self.outbox.append(ip_header(ip.dst, ip.src, 6, 40, 0, 64, 0, 0) + rst[:16] + _U16.pack(csum) + rst[18:])
        self.stats["legacy_resets_sent"] += 1

    def _reset_legacy(self, flow: Flow) -> None:
        """Tell the legacy host its connection is gone (a RST in its window). A legacy
        client still waiting for its SYN-ACK takes only a RST that acknowledges its SYN
        (RFC 793, SYN-SENT): it hears "connection refused"."""
        if flow.udp is not None:
            self._udp_refused(flow)            # no TCP reset for a UDP host
            return
        if flow.legacy_key is None:
            return
        if self.refresh is not None:
            self.refresh(flow)                 # the legacy host's last ACK may be newer there
        if self.role == "client" and not flow.sal.remote_flow and flow.syn_seq is not None:
            self._legacy_rst(flow, 0, (flow.syn_seq + 1) & 0xFFFFFFFF, TCP_RST | TCP_ACK)
        else:
            self._legacy_rst(flow, flow.legacy_last_ack, 0, TCP_RST)

    def _legacy_rst(self, flow: Flow, seq: int, ack: int, flags: int) -> None:
        """A RST to the flow's legacy host, as from the address and port it talks to."""
        seg = struct.pack("!HHIIBBHHH", flow.legacy_dport, flow.legacy_sport, seq, ack, 0x50, flags, 0, 0, 0)
        csum = transport_checksum(flow.legacy_dst, flow.legacy_src, 6, seg, 16)
        seg = seg[:16] + _U16.pack(csum) + seg[18:]
        self.outbox.append(ip_header(flow.legacy_dst, flow.legacy_src, 6, 40, 0, 64, 0, 0) + seg)
        self.stats["legacy_resets_sent"] += 1

    # --- views ---------------------------------------------------------------------
    def flow_rows(self, now: float) -> list[dict]:
        rows = []
        for flow in self.flows.values():
            rows.append({
                "legacy": f"{ntoa(flow.legacy_src)}:{flow.legacy_sport} -> {ntoa(flow.legacy_dst)}:{flow.legacy_dport}"
                + ("" if flow.udp is None else " udp")
                if flow.legacy_key is not None or flow.udp is not None else "-",
                "local_flow": f"{flow.sal.local_flow:08x}",
                "remote_flow": f"{flow.sal.remote_flow:08x}",
                "peer": ntoa(flow.peer_addr) + (f":{flow.peer_port}" if flow.peer_port else ""),
                "state": flow.sal.state.value if flow.sal.state else "-",
                "bytes_out": flow.bytes_out, "bytes_in": flow.bytes_in,
                "age": round(now - flow.created, 1),
            })
        return rows


def _fin_end(seg: bytes) -> int:
    """The sequence number just past a FIN segment (its data and the FIN itself)."""
    return (_U32.unpack_from(seg, 4)[0] + len(seg) - (seg[12] >> 4) * 4 + 1) & 0xFFFFFFFF


def _seq_geq(a: int, b: int) -> bool:
    return ((a - b) & 0xFFFFFFFF) < 0x80000000
